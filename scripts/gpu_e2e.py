"""The user's headline command end to end: ``approxtrain model=wrn dataset=synthetic sampler=exact|topk
ratio=0.5`` (one epoch of synthetic CIFAR-100-shaped data, no logger), run as the CLI in a subprocess
per configuration (exact; topk under each kernel backend), reading each run's ``results.json``.

Prints the median training step of each and the speedups over exact; writes ``--json``.

    python scripts/gpu_e2e.py --json e2e.json                   # WRN-28-10, batch 128 (CUDA)
    python scripts/gpu_e2e.py --smoke --json /tmp/e2e.json      # the MLP at batch 8 (any device)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import approxtrain  # noqa: F401 - only whether it imports
except ModuleNotFoundError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from approxtrain.kernels import parse_backend


def run(overrides: list[str], kernels: str, run_dir: Path, timeout: float) -> dict:
    env = {**os.environ, "APPROXTRAIN_KERNELS": kernels, "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "approxtrain.cli.train", *overrides, f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    row = {"command": " ".join(overrides), "kernels": kernels, "rc": done.returncode, "wall_s": time.perf_counter() - started}
    results = run_dir / "results.json"
    if results.exists():
        r = json.loads(results.read_text())
        row.update({key: r.get(key) for key in ("status", "device", "step_time_s", "compute_reduction", "error")})
    if done.returncode != 0:
        row["stderr_tail"] = done.stderr[-3000:]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--kernels", nargs="+", default=["torch", "triton"],
                        help="APPROXTRAIN_KERNELS of the topk runs: torch, triton, triton:<pieces>")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in args.kernels or []:  # torch, triton or triton:<pieces>
        try:
            parse_backend(name, "--kernels")
        except ValueError as error:
            parser.error(str(error))
    if args.smoke:
        common = ["model=mlp", "dataset=synthetic", "dataset.batch_size=8", "dataset.num_samples=64", "trainer.num_workers=0"]
    else:
        common = ["model=wrn", "dataset=synthetic", "dataset.batch_size=128", "dataset.num_samples=8192", "trainer.num_workers=4"]
    common += ["ratio=0.5", "logger=none", "trainer.epochs=1"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_e2e_") as tmp:
        variants = [("exact", "torch")] + [("topk", backend) for backend in args.kernels]
        for sampler, backend in variants:
            row = run([*common, f"sampler={sampler}"], backend, Path(tmp) / f"{sampler}_{backend}", args.timeout)
            row["config"] = sampler if sampler == "exact" else f"topk 0.5 [{backend}]"
            rows.append(row)
            step = row.get("step_time_s")
            print(f"{row['config']:<20} rc {row['rc']}  median step {step * 1e3 if step else float('nan'):.2f} ms  "
                  f"wall {row['wall_s']:.1f} s", flush=True)
            if row["rc"] != 0:
                print(row.get("stderr_tail", ""), flush=True)
    exact = rows[0].get("step_time_s")
    for row in rows[1:]:
        if exact and row.get("step_time_s"):
            row["speedup"] = exact / row["step_time_s"]
            print(f"{row['config']}: {row['speedup']:.2f}x exact", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"common": common, "rows": rows}, indent=1))
    return 0 if all(row["rc"] == 0 for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Data-parallel step benchmark: 2 ranks (gloo on the CPU, nccl with --device cuda), step time and
gradient bytes per step, exact vs top-k with DDP's full all-reduce, bf16 compression and the
sampled all-reduce (:mod:`approxtrain.run.distributed`), plus a model of the step at link speeds.

For each model (the paper's layer rules; random data shaped like its paper dataset) and each
configuration, both ranks train ``--steps`` timed steps after ``--warmup``; rank 0 reports the
median step and the bytes its comm hook all-reduced per step (deterministic). ``compute_s`` is
the median step of the same model and ratio in one process without DDP (same per-rank batch; the
other rank waits at a barrier meanwhile).
The link model: ``step(bw) = compute_s + 2 (w - 1) / w * bytes / bw`` (a ring all-reduce, w
ranks, no overlap with backward: an upper bound), at 10/25/100 Gb/s; ``speedup`` is exact/full
over each configuration, to set against the thesis's 1.09-1.37x multi-node speedups.
``score_bytes``: what ``selection=global`` all-reduces in forward per step (the input norms,
n floats per approximated layer), which ``selection=weights`` does not; ``score_allreduce_s``: the
time of those all-reduces here (each layer's timed alone, median of 20, summed).

    python scripts/bench_distributed.py                       # mlp cnn wrn resnet50, CPU batches
    python scripts/bench_distributed.py --models mlp cnn --steps 5 --json outputs/bench_distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from approxtrain import approximate_
from approxtrain.config import layer_rules
from approxtrain.data.synthetic import like_info
from approxtrain.models import build_model
from approxtrain.modules import ApproxConv2d, ApproxLinear
from approxtrain.run.distributed import Communication, Distributed
from bench_train import _batch, _optimizer, _run_config, _step, _sync

# (name, sampler ratio or None for exact, gradient all-reduce, selection)
CONFIGS = (
    ("exact/full", None, "full", "global"),
    ("exact/bf16", None, "bf16", "global"),
    ("topk/full", 0.5, "full", "global"),
    ("topk/sampled", 0.5, "sampled", "global"),
    ("topk/sampled/weights", 0.5, "sampled", "weights"),
)
CPU_BATCH = {"mlp": 64, "cnn": 64, "wrn": 4, "resnet50": 2}  # per rank
LINKS_GBPS = (10, 25, 100)
WORLD_SIZE = 2


def _model(name: str, ratio: float | None, device: torch.device):
    cfg = _run_config(name, 1)
    cfg["sampler"]["name"] = "topk" if ratio else "exact"
    cfg["ratio"] = ratio or 1.0
    info = like_info(cfg["dataset"]["name"])
    torch.manual_seed(0)
    model = build_model(cfg["model"], info).to(device)
    approximate_(model, layer_rules(cfg), generator=torch.Generator(device=device).manual_seed(0))
    return model, info


def _bf16_compressed(model, device) -> tuple[torch.nn.Module, Communication]:
    """``model`` in DDP with torch's own ``bf16_compress_hook`` (approxtrain's hook sends fp32), and its bytes."""
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sent = Communication()

    def hook(state, bucket):
        buffer = bucket.buffer()
        sent.exact_bytes += buffer.numel() * buffer.element_size()
        sent.actual_bytes += buffer.numel() * torch.finfo(torch.bfloat16).bits // 8
        return default_hooks.bf16_compress_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    return ddp, sent


def _time_steps(model, info, batch: int, device, warmup: int, steps: int, distributed: bool) -> list[float]:
    optimizer = _optimizer(model)
    x, y = _batch(info, batch, device, False, None, 35)
    times = []
    for index in range(warmup + steps):
        if distributed:
            dist.barrier()
        _sync(device)
        start = time.perf_counter()
        _step(model, optimizer, x, y, info, None, device)
        _sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _scored_pairs(model) -> list[int]:
    """``n`` of each sampled layer: the floats ``selection=global`` all-reduces for it in forward."""
    return [m.weight.shape[1] for m in model.modules() if isinstance(m, (ApproxLinear, ApproxConv2d)) and m.sampling.policy != "exact"]


def _score_allreduce_s(model, device, repeats: int = 20) -> float:
    """The forward all-reduces ``selection=global`` adds to a step: per layer the median of ``repeats``."""
    total = 0.0
    for n in _scored_pairs(model):
        norms, times = torch.ones(n, device=device), []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(norms)
            _sync(device)
            times.append(time.perf_counter() - start)
        total += statistics.median(times)
    return total


def _rank(rank: int, port: int, args: argparse.Namespace) -> list[dict]:
    """This rank's side of every measurement; rank 0 returns the rows."""
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=600))
    torch.set_num_threads(args.threads)
    rows, compute = [], {}  # compute: (model, ratio) -> median one-process step, measured once
    for name in args.models:
        batch = args.batch or CPU_BATCH.get(name, 32)
        for label, ratio, allreduce, selection in CONFIGS:
            model, info = _model(name, ratio, device)
            if allreduce == "bf16":
                wrapped, sent = _bf16_compressed(model, device)
            else:
                parallel = Distributed(rank, WORLD_SIZE, rank, None, selection, allreduce)
                wrapped = parallel.wrap(model, device)
                sent = parallel.communication()
            times = _time_steps(wrapped, info, batch, device, args.warmup, args.steps, True)
            steps = args.warmup + args.steps
            row = {"model": name, "config": label, "batch_per_rank": batch, "step_s": statistics.median(times),
                   "exact_bytes": sent.exact_bytes // steps, "actual_bytes": sent.actual_bytes // steps,
                   "score_bytes": 4 * sum(_scored_pairs(model)) if selection == "global" and ratio else 0,
                   "score_allreduce_s": _score_allreduce_s(model, device) if selection == "global" and ratio else 0.0}
            if rank == 0:
                if (name, ratio) not in compute:
                    alone, _ = _model(name, ratio, device)
                    compute[name, ratio] = statistics.median(_time_steps(alone, info, batch, device, args.warmup, 2 * args.steps, False))
                row["compute_s"] = compute[name, ratio]
                rows.append(row)
                print(f"{name:9s} {label:22s} step {row['step_s'] * 1e3:9.1f} ms  compute {row['compute_s'] * 1e3:9.1f} ms  "
                      f"bytes/step {row['actual_bytes']:>12,} of {row['exact_bytes']:>12,}  "
                      f"scores {row['score_bytes']:>7,} B {row['score_allreduce_s'] * 1e3:6.2f} ms", flush=True)
            dist.barrier()
    dist.destroy_process_group()
    return rows


def _link_model(rows: list[dict]) -> None:
    """Add the modelled step at each link speed and the speedup over the model's exact/full."""
    ring = 2 * (WORLD_SIZE - 1) / WORLD_SIZE
    for row in rows:
        for gbps in LINKS_GBPS:
            row[f"step_{gbps}gbps_s"] = row["compute_s"] + ring * (row["actual_bytes"] + row["score_bytes"]) * 8 / (gbps * 1e9)
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["config"] == "exact/full")
        for gbps in LINKS_GBPS:
            row[f"speedup_{gbps}gbps"] = base[f"step_{gbps}gbps_s"] / row[f"step_{gbps}gbps_s"]


def _worker(rank: int, port: int, args: argparse.Namespace, queue) -> None:
    rows = _rank(rank, port, args)
    if rank == 0:
        queue.put(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "wrn", "resnet50"])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="per rank (default: per model, CPU-sized)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < WORLD_SIZE:
        parser.error(f"--device cuda needs {WORLD_SIZE} GPUs; this machine has {torch.cuda.device_count()}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(port, args, queue), nprocs=WORLD_SIZE, join=True)
    rows = queue.get()
    _link_model(rows)
    print("\nmodelled step (compute + ring all-reduce of the bytes, no overlap), speedup vs exact/full:")
    for row in rows:
        links = "  ".join(f"{gbps:>3} Gb/s {row[f'step_{gbps}gbps_s'] * 1e3:8.1f} ms ({row[f'speedup_{gbps}gbps']:.2f}x)"
                          for gbps in LINKS_GBPS)
        print(f"{row['model']:9s} {row['config']:22s} {links}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": args.device, "world_size": WORLD_SIZE, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Smoke tests of the stand-alone scripts, run as subprocesses on tiny problems."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(SCRIPTS / name), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), SCRIPTS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matmul_error_writes_csv_png_and_observations(tmp_path: Path) -> None:
    result = run_script("matmul_error.py", "--draws", "50", "--size", "40", "--seed", "1", "--out", str(tmp_path))
    module = load_script("matmul_error.py")

    with (tmp_path / "matmul_error.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"case", "variant", "ratio", "k", "mean_error", "std_error", "draws"}
    expected = {(case, variant, f"{r:.1f}") for case in module.CASES for variant in module.VARIANTS for r in module.RATIOS}
    assert {(r["case"], r["variant"], r["ratio"]) for r in rows} == expected
    assert len(rows) == len(expected) == 2 * 8 * 10
    for r in rows:
        assert int(r["draws"]) == 50
        assert float(r["mean_error"]) >= 0.0
        if r["ratio"] == "1.0" and r["variant"] not in ("nps_repl_scale", "uniform_repl_scale"):
            assert float(r["mean_error"]) < 1e-9  # every pair kept once, unscaled: the exact product
    assert (tmp_path / "matmul_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for number in ("(1)", "(2)", "(3)"):
        lines = [line for line in result.stdout.splitlines() if number in line and ("[PASS]" in line or "[FAIL]" in line)]
        assert len(lines) == 1, f"observation {number} not reported:\n{result.stdout}"


def test_matmul_error_gram_identity_matches_direct_products() -> None:
    module = load_script("matmul_error.py")
    generator = torch.Generator().manual_seed(0)
    for case in module.CASES:
        a, b = module.draw_matrices(case, 6, 12, generator)
        scores = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=2)
        gram = module.pair_gram(a, b)
        scale = torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b)
        for config, _ in module.VARIANTS.values():
            weights = module.select_weights(scores, 5, config, generator)
            fast = module.relative_errors(gram, scale, weights)
            torch.testing.assert_close(fast, module.relative_errors_direct(a, b, weights), rtol=1e-9, atol=1e-12)
            # the literal A[:, keep] D B[keep, :] for one draw
            selection = module.select(scores[0], 5, config, torch.Generator().manual_seed(3))
            w = module.select_weights(scores[:1], 5, config, torch.Generator().manual_seed(3))
            d = torch.ones(selection.keep.numel(), dtype=torch.float64) if selection.scale is None else selection.scale.double()
            literal = a[0][:, selection.keep] * d @ b[0][selection.keep, :]
            torch.testing.assert_close(a[0] * w[0] @ b[0], literal)


def test_bench_ops_tiny_shapes_write_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_script("bench_ops.py", "--device", "cpu", "--linear", "32,64,64", "--conv", "2,8,8,3,8",
                        "--repeats", "2", "--warmup", "1", "--json", str(out))
    data = json.loads(out.read_text())
    assert data["meta"]["torch"] == torch.__version__
    assert data["meta"]["device_name"]
    assert data["meta"]["threads"] >= 1
    assert "malloc" in data["meta"]
    results = data["results"]
    for op in ("linear", "conv2d"):
        by_ratio = {r["ratio"]: r for r in results if r["op"] == op}
        assert set(by_ratio) == {1.0, 0.5, 0.25}
        for ratio, r in by_ratio.items():
            assert r["speedup"] > 0 and r["exact_ms"]["median"] > 0 and r["approx_ms"]["median"] > 0
            assert r["flop_bound"] == pytest.approx(r["n"] / r["k"])
            assert r["saved_bytes"]["approx"]["all"] > 0
        assert by_ratio[1.0]["overhead"] is not None and by_ratio[1.0]["k"] == by_ratio[1.0]["n"]
        assert by_ratio[0.5]["selection_share"] > 0
        pieces = by_ratio[0.5]["pieces_ms"]  # from the op's own profiler ranges
        assert set(pieces) == {"select", "gathers", "scatter"} and all(ms > 0 for ms in pieces.values())
        # CRS saves only the sampled slice of the input for backward
        assert by_ratio[0.25]["saved_bytes"]["approx"]["all"] < by_ratio[1.0]["saved_bytes"]["approx"]["all"]
    assert {t["op"] for t in data["targets"]} == {"linear", "conv2d"}
    # the approximate linear runs on the layout ApproxLinear stores; the exact one on nn.Linear's
    assert all(r["shape"]["approx_weight_layout"] == "column" for r in results if r["op"] == "linear")
    assert "Targets:" in result.stdout


def test_bench_train_interleaves_configurations_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench_train.json"
    run_script("bench_train.py", "--device", "cpu", "--models", "mlp", "--ratios", "0.5", "--warmup", "1",
               "--repeats", "3", "--profile-steps", "1", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == ["exact", "topk 0.5"]
    exact, approx = rows
    assert exact["rounds"] == approx["rounds"] == 3 and len(approx["times_s"]) == 3
    assert exact["speedup"] == 1.0
    paired = sorted(e / a for e, a in zip(exact["times_s"], approx["times_s"]))
    assert approx["speedup"] == pytest.approx(paired[1])  # the median of the per-round ratios
    assert approx["planned_compute_reduction"] == pytest.approx(0.5)
    assert approx["measured_compute_reduction"] == pytest.approx(0.5)
    assert approx["fraction_of_bound"] == pytest.approx(approx["speedup"] / 2.0)
    assert approx["select_share"] > 0 and approx["gather_scatter_share"] > 0
    assert approx["saved_activation_bytes"] < exact["saved_activation_bytes"]
    assert approx["step_peak_bytes"] is None  # CUDA only

"""Smoke tests of the stand-alone scripts, run as subprocesses on tiny problems."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
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
        for r in by_ratio.values():
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


def test_bench_host_measures_every_variant_and_counts_operators(tmp_path: Path) -> None:
    out = tmp_path / "host.json"
    result = run_script("bench_host.py", "--device", "cpu", "--calls", "2", "--repeats", "2", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    variants = list(load_script("bench_host.py").VARIANTS)
    assert [(r["layer"], r["variant"], r["kernels"]) for r in rows] == \
        [(layer, v, "torch") for layer in ("linear", "conv2d") for v in variants]
    for layer in ("linear", "conv2d"):
        by_variant = {r["variant"]: r for r in rows if r["layer"] == layer}
        assert all(r["us_per_call"] > 0 for r in by_variant.values()) and by_variant["exact"]["extra_us"] == 0
        # ratio 1.0 takes the exact path: the same operators as the untouched layer
        assert by_variant["ratio 1.0"]["op_counts"] == by_variant["exact"]["op_counts"]
        assert by_variant["topk 0.5"]["ops"] > by_variant["exact"]["ops"]
        assert all(not name.startswith("profiler::") for r in by_variant.values() for name in r["op_counts"])
    assert "extra us" in result.stdout


def test_bench_host_rejects_triton_without_cuda(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA runs the Triton kernels")
    with pytest.raises(SystemExit) as exit_info:
        load_script("bench_host.py").main(["--device", "cpu", "--kernels", "triton"])
    assert exit_info.value.code == 2
    assert "--kernels triton runs the Triton kernels on CUDA only" in capsys.readouterr().err


def test_bench_ops_measures_every_shape_given(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_script("bench_ops.py", "--device", "cpu", "--linear", "8,16,16", "16,32,32", "--conv", "none",
                        "--ratios", "1.0,0.5", "--repeats", "1", "--warmup", "0", "--json", str(out))
    data = json.loads(out.read_text())
    cases = ["linear 8x16->16", "linear 16x32->32"]
    assert [(r["case"], r["ratio"]) for r in data["results"]] == [(case, ratio) for case in cases for ratio in (1.0, 0.5)]
    assert [r["shape"]["in_features"] for r in data["results"]] == [16, 16, 32, 32]
    assert {t["case"] for t in data["targets"]} == set(cases)  # the targets are judged per shape
    assert all(f"-- {case} " in result.stdout for case in cases)


def test_bench_train_writes_kernel_profile_of_exact_and_first_ratio(tmp_path: Path) -> None:
    run_script("bench_train.py", "--device", "cpu", "--models", "mlp", "--batch", "2", "--ratios", "0.5", "0.3",
               "--warmup", "0", "--repeats", "1", "--profile-steps", "0", "--kernel-profile", str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["profile_mlp.txt"]
    text = (tmp_path / "profile_mlp.txt").read_text()
    assert "== mlp, exact ==" in text and "== mlp, topk 0.5 ==" in text and "topk 0.3" not in text
    assert text.count("Self CPU %") == 2 and "aten::mm" in text  # CPU: operators by self CPU time


def test_bench_train_runs_each_batch_and_kernel_backend(tmp_path: Path) -> None:
    out = tmp_path / "bench_train.json"
    run_script("bench_train.py", "--device", "cpu", "--models", "mlp", "--batch", "2", "3", "--ratios", "0.5",
               "--kernels", "torch", "triton", "--reselect-every", "3", "--warmup", "0", "--repeats", "1",
               "--profile-steps", "0", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["config"], r["kernels"], r["reselect_every"]) for r in rows] == [
        (batch, config, kernels, every) for batch in (2, 3)
        for config, kernels, every in (("exact", "torch", 1), ("topk 0.5", "torch", 1), ("topk 0.5 [triton]", "triton", 1),
                                       ("topk 0.5 reselect 3 [triton]", "triton", 3))]


@pytest.mark.parametrize("args, message", [
    (["--compile", "--kernel-profile", "out"], "--kernel-profile with --compile"),
    (["--compile", "--compile-backend", "nope"], "--compile-backend='nope' is unknown; allowed: "),
    (["--cuda-graphs", "--compile"], "--cuda-graphs replays captured steps: not with --compile"),
    (["--cuda-graphs", "--reselect-every", "4"], "not with --compile, --kernel-profile or --reselect-every"),
    (["--cuda-graphs"], "--cuda-graphs needs a CUDA device; the device here is cpu"),
])
def test_bench_train_rejects_bad_flag_combinations(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_script("bench_train.py").main(["--device", "cpu", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_train_captures_the_whole_step_once_and_times_replays(monkeypatch) -> None:
    # CUDA graphs need a GPU: here torch.cuda's stream and graph calls are stand-ins that record what
    # the benchmark does with them (the capture itself is for gpu_check's graphs stage to run)
    import contextlib
    import types

    bench = load_script("bench_train.py")
    events: list[str] = []

    class Graph:
        def replay(self) -> None:
            events.append("replay")

    @contextlib.contextmanager
    def capture(graph):
        events.append("capture start")
        yield
        events.append("capture end")

    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    info = bench.like_info("mnist")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    model.register_forward_hook(lambda *args: events.append("forward"))
    model[1].weight.register_hook(lambda grad: events.append("backward"))
    before = model[1].weight.detach().clone()
    rows = bench._measure_graphed([model], info, 4, torch.device("cpu"), None, False, None, None, 2, 3)
    assert events == ["forward", "backward"] * 3 + ["capture start", "forward", "backward", "capture end"] + ["replay"] * 3
    assert not torch.equal(model[1].weight, before)  # the captured step includes the optimizer's
    assert [row["rounds"] for row in rows] == [3] and rows[0]["median_s"] >= 0


GPU_CHECK = SCRIPTS / "gpu_check.sh"
GPU_CHECK_FILES = {"gpu_check.json", "gpu_check.txt", "gpu_check.log"}
STAGES = ("tests", "host", "probe", "e2e", "train", "train_resnet50", "compile_wrn")  # and "graphs", on CUDA only


def run_gpu_check(out: Path, env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``bash scripts/gpu_check.sh ARGS`` (default ``--smoke``) with ``OUT=out`` and ``env``."""
    environment = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(GPU_CHECK), *(args or ["--smoke"])], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_check_runs_every_stage_after_failures_and_exits_non_zero(tmp_path: Path) -> None:
    # a python that fails the probe and the headline run: both stages run and fail, the report says so
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\ncase "$1" in scripts/gpu_probe.py|scripts/gpu_e2e.py) exit 3;; esac\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    result = run_gpu_check(tmp_path / "out", {"PYTHON": str(python), "GPU_CHECK_STAGES": "probe e2e"})
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [(s["name"], s["status"], s["rc"], s["results"]) for s in report["stages"]] == \
        [("probe", "fail", 3, None), ("e2e", "fail", 3, None)]
    assert report["mode"] == "smoke" and report["passed"] is False
    assert all(goal["met"] is None for goal in report["goals"])  # nothing measured: no goal is called met
    assert "RESULT: FAIL (probe, e2e)" in (tmp_path / "out" / "gpu_check.txt").read_text()


def test_gpu_check_skips_stages_past_its_budget(tmp_path: Path) -> None:
    result = run_gpu_check(tmp_path, {"GPU_CHECK_BUDGET_S": "0"})
    assert result.returncode == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(s["name"], s["status"]) for s in report["stages"]] == \
        [(name, "skipped") for name in STAGES]
    assert {p.name for p in tmp_path.iterdir()} == GPU_CHECK_FILES


@pytest.mark.parametrize("env, args, message", [
    ({"GPU_CHECK_STAGES": "ops"}, ["--smoke"],
     "GPU_CHECK_STAGES names 'ops'; allowed: tests host probe e2e train train_resnet50 compile_wrn graphs"),
    ({"GPU_CHECK_BUDGET_S": "5m"}, ["--smoke"], "GPU_CHECK_BUDGET_S='5m' is invalid"),
    ({"GPU_CHECK_SMOKE": "yes"}, ["--smoke"], "GPU_CHECK_SMOKE='yes' is invalid; allowed: 0, 1"),
    ({}, ["--smoke", "--fast"], "unknown argument '--fast'; allowed: --smoke, --help"),
    ({"GPU_CHECK_KERNELS": "torch triton:nope"}, ["--smoke"],
     "gpu_check.sh: GPU_CHECK_KERNELS='triton:nope' is invalid; allowed: torch, triton, triton:<pieces> with pieces from"),
])
def test_gpu_check_rejects_bad_settings(tmp_path: Path, env: dict[str, str], args: list[str], message: str) -> None:
    result = run_gpu_check(tmp_path, env, *args)
    assert result.returncode == 2 and message in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage_without_wandb(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"  # as on the GPU machine: W&B is not there (hydra comes as carried wheels)
    for name in ("wandb",):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    out = tmp_path / "out"
    result = run_gpu_check(out, {"PYTHONPATH": str(blocked)}, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert tuple(stages) == STAGES
    assert all(s["status"] == "pass" and s["rc"] == 0 for s in stages.values())
    assert stages["tests"]["results"]["tests"] > 0 and stages["tests"]["results"]["failures"] == 0
    assert {(r["layer"], r["kernels"]) for r in stages["host"]["results"]["rows"]} == {("linear", "torch"), ("conv2d", "torch")}
    probe = stages["probe"]["results"]
    assert [r["shape"] for r in probe["rows"]] == ["linear_64x48", "conv_16@6"] and probe["backends"] == ["torch", "triton"]
    for row in probe["rows"]:  # every piece timed under both backends (the kernels interpreted on a CPU)
        assert {"exact", "ceiling", "ratio1", "approx_torch", "approx_triton"} <= set(row["ms"])
        assert set(row["pieces_ms"]["triton"]) == set(row["pieces_ms"]["torch"]) >= {"scores", "topk", "gather_input"}
    assert [(r["config"], r["rc"], r["status"]) for r in stages["e2e"]["results"]["rows"]] == \
        [("exact", 0, "finished"), ("topk 0.5 [torch]", 0, "finished")]
    for stage, model in (("train", "cnn"), ("train_resnet50", "mlp")):
        expected = ["exact", "topk 0.5"] + (["topk 0.5 reselect 4"] if stage == "train" else [])
        assert [(r["model"], r["config"]) for r in stages[stage]["results"]["rows"]] == [(model, c) for c in expected]
        profile = (out / f"profile_{model}.txt").read_text()
        assert f"== {model}, exact ==" in profile and f"== {model}, topk 0.5 ==" in profile
    assert [r["config"] for r in stages["compile_wrn"]["results"]["rows"]] == ["exact", "topk 0.5"]
    goals = {g["goal"]: g for g in report["goals"]}
    assert goals["compile: a sampled WRN compiles (and runs its timed steps) in < 90 s"]["met"] is True
    assert "goals of issue 18 (smoke: tiny shapes, not a measurement):" in (out / "gpu_check.txt").read_text()
    assert "host us per layer call (forward + backward), over the untouched layer's: linear ratio 1.0 [torch]" in \
        (out / "gpu_check.txt").read_text()
    # what the GPU machine returns: at most 8 files, plain names
    assert {p.name for p in out.iterdir()} == GPU_CHECK_FILES | {"profile_cnn.txt", "profile_mlp.txt"}
    assert "RESULT: PASS" in (out / "gpu_check.txt").read_text() and "RESULT: PASS" in result.stdout


def test_adaptive_candidates_allocates_by_score_share_per_mac() -> None:
    allocate = load_script("adaptive_candidates.py").allocate
    scores = {"a": torch.tensor([4.0, 3.0, 2.0, 1.0]), "b": torch.tensor([1.0, 1.0])}
    # per MAC: a 0.4 0.3 0.2 0.1 (cost 1 each), b 0.25 0.25 (cost 2 each): a budget of 6 keeps a's 0.4, 0.3, both b's
    assert allocate(scores, {"a": 1, "b": 2}, 6) == {"a": 2, "b": 2}
    assert allocate(scores, {"a": 1, "b": 2}, 0) == {"a": 1, "b": 1}  # at least one pair each


def test_adaptive_candidates_mac_weighted_run_measures_the_fixed_ratios_compute(tmp_path: Path) -> None:
    run_script("adaptive_candidates.py", "--out", str(tmp_path), "--ratio", "0.5", "--every", "5", "--seeds", "0", "--",
               "model=mlp", "dataset=digits", "trainer.epochs=1", "trainer.max_steps=12")
    rows = {method: json.loads((tmp_path / method / "seed0.json").read_text()) for method in ("fixed", "macweighted")}
    assert rows["fixed"]["compute_reduction"] > 0.3
    assert abs(rows["macweighted"]["compute_reduction"] - rows["fixed"]["compute_reduction"]) < 0.01
    assert rows["macweighted"]["layer_k"] and rows["macweighted"]["status"] == rows["fixed"]["status"]


def test_adaptive_candidates_relative_variance_is_the_optimal_bernoulli_crs_variance() -> None:
    relative_variance = load_script("adaptive_candidates.py").relative_variance
    # scores 3, 1, 0 (mass 4): k=1: p = 3/4, 1/4 -> (4/3 - 1) 9 + (4 - 1) 1 = 6; k=2: p = 1, 1 -> 0
    assert torch.allclose(relative_variance(torch.tensor([1.0, 3.0, 0.0])), torch.tensor([6 / 16, 0.0, 0.0], dtype=torch.float64))
    # one score of 10 among four of 1, k=2: the 10 is kept surely, the rest p = 1/4: 4 (4 - 1) 1 = 12 over 14^2
    assert relative_variance(torch.tensor([10.0, 1, 1, 1, 1]))[1].item() == pytest.approx(12 / 196)
    assert relative_variance(torch.ones(4)).tolist() == pytest.approx([3 / 4, 1 / 4, 1 / 12, 0])


def test_adaptive_candidates_variance_budget_gives_flat_scores_more_pairs() -> None:
    allocate_variance = load_script("adaptive_candidates.py").allocate_variance
    scores = {"concentrated": torch.tensor([100.0, 1, 1, 1, 1, 1, 1, 1]), "flat": torch.ones(8)}
    k = allocate_variance(scores, {"concentrated": 1, "flat": 1}, 8)
    assert sum(k.values()) == 8 and k["concentrated"] < k["flat"]  # equal cost: the flat layer's error falls slower
    # a pair of "flat" costs 3: the budget of 10 buys 1 + 3 (3 MACs each) plus 1 + 2 of "concentrated", never more
    k = allocate_variance(scores, {"concentrated": 1, "flat": 3}, 10)
    assert k["concentrated"] + 3 * k["flat"] <= 10 and k["flat"] >= 2
    assert allocate_variance(scores, {"concentrated": 1, "flat": 1}, 0) == {"concentrated": 1, "flat": 1}


def test_adaptive_candidates_variance_run_measures_the_fixed_ratios_compute(tmp_path: Path) -> None:
    run_script("adaptive_candidates.py", "--out", str(tmp_path), "--ratio", "0.5", "--every", "5", "--seeds", "0",
               "--methods", "variance", "--", "model=mlp", "dataset=digits", "trainer.epochs=1", "trainer.max_steps=12")
    rows = {method: json.loads((tmp_path / method / "seed0.json").read_text()) for method in ("fixed", "variance")}
    assert not (tmp_path / "macweighted").exists()
    assert abs(rows["variance"]["compute_reduction"] - rows["fixed"]["compute_reduction"]) < 0.01
    assert rows["variance"]["layer_k"] and rows["variance"]["layer_k"] != rows["fixed"]["layer_k"]


def test_adaptive_candidates_variance_budget_charges_every_call_of_an_unrolled_lstm(tmp_path: Path) -> None:
    # the gates run once per time step: scored and charged over all the step's calls, the budget is the step's
    run_script("adaptive_candidates.py", "--out", str(tmp_path), "--ratio", "0.5", "--every", "2", "--seeds", "0",
               "--methods", "variance", "--", "model=lstm", "dataset=synthetic", "dataset.num_samples=2000",
               "dataset.seq_len=6", "layers=gates", "model.hidden=128", "trainer.epochs=1", "trainer.max_steps=6")
    rows = {method: json.loads((tmp_path / method / "seed0.json").read_text()) for method in ("fixed", "variance")}
    assert set(rows["variance"]["layer_k"]) == {"rnn.0.gates", "rnn.1.gates", "decoder"}
    assert abs(rows["variance"]["compute_reduction"] - rows["fixed"]["compute_reduction"]) < 0.01

"""Tests of approxtrain-compare on hand-built run dirs (no training needed)."""

from __future__ import annotations

import json
import os
import sys
import time
import types
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from approxtrain.accounting import ProductMACs
from approxtrain.cli.compare import main
from approxtrain.compare import build_rows, collect_runs, print_sweep_table, to_csv, to_json
from approxtrain.compare.matching import flatten, setting_key, varying_keys
from approxtrain.compare.plots import pareto_front
from approxtrain.compare.table import Table
from approxtrain.run.schema import (
    ACCURACY,
    FAILED,
    FINISHED,
    PERPLEXITY,
    RESULTS_FILE,
    RUNNING,
    EpochRecord,
    Results,
    results_path,
    summary_of,
)
from approxtrain.run.schema import STATUSES as SCHEMA_STATUSES
from approxtrain.surgery import PlanRow
from conftest import write_run_dir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Optimizer steps per epoch of the fabricated runs (digits: 1437 training images / 50).
STEPS_PER_EPOCH = 29


# --------------------------------------------------------------------------- fixtures


def write_run(
    run_dir: Path,
    *,
    model: str = "mlp",
    dataset: str = "digits",
    sampler: str = "exact",
    ratio: float = 0.3,
    seed: int = 0,
    best: float | None = 0.9,
    step_time: float = 0.01,
    reduction: float | None = None,
    status: str = FINISHED,
    epochs_done: int = 3,
    epochs_planned: int = 3,
    metric_name: str = ACCURACY,
    lr: float = 0.1,
    error: str | None = None,
    epoch_step_times: list[float] | None = None,
) -> Path:
    """Write a realistic run dir without training: results.json through the schema, the
    composed config and the overrides in .hydra/ (see conftest.write_run_dir). Every epoch's
    median step is ``step_time`` unless ``epoch_step_times`` gives one per epoch."""
    if reduction is None:
        reduction = 0.0 if sampler == "exact" else round(1 - ratio * 1.6, 3)
    epochs = [
        EpochRecord(epoch=e, step=e * STEPS_PER_EPOCH, train_loss=0.5 / e,
                    test_metric=None if best is None else best - 0.01 * (epochs_done - e),
                    compute_reduction=reduction, time_s=1.0,
                    step_time_s=step_time if epoch_step_times is None else epoch_step_times[e - 1], lr=lr)
        for e in range(1, epochs_done + 1)
    ]
    plan_row = PlanRow("fc1", "Linear", n=64, k=19, ratio=19 / 64, policy=sampler, rule=0,
                       exact_macs=ProductMACs(32 * 64 * 10, 32 * 64 * 10, 32 * 64 * 10))
    results = Results(
        model=model, dataset=dataset, sampler=sampler, ratio=ratio, seed=seed, layers_rule_set="paper",
        metric_name=metric_name, status=status, best_metric=best, final_metric=best, compute_reduction=reduction,
        planned_compute_reduction=reduction, epochs=[asdict(record) for record in epochs],
        layers=[plan_row.to_dict()], wall_time_s=12.3, step_time_s=step_time, steps=epochs_done * STEPS_PER_EPOCH,
        device="cpu", error=error,
    )
    return write_run_dir(run_dir, results, f"trainer.epochs={epochs_planned}", f"trainer.optimizer.lr={lr}")


LSTM = {"model": "lstm", "dataset": "ptb", "metric_name": PERPLEXITY}


def make_sweep(tmp_path: Path) -> Path:
    """A multirun dir: mlp/digits exact/topk/nps x 2 seeds, one topk run with another lr,
    a running run, a corrupt and a missing results.json, and lstm/ptb with perplexity."""
    root = tmp_path / "outputs" / "multiruns" / "2024-01-01_00-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {mode: MULTIRUN}\n")
    specs: list[dict[str, Any]] = [
        dict(sampler="exact", seed=0, best=0.95, step_time=0.010),
        dict(sampler="exact", seed=1, best=0.93, step_time=0.012),
        dict(sampler="topk", seed=0, best=0.94, step_time=0.005, reduction=0.50),
        dict(sampler="topk", seed=1, best=0.90, step_time=0.006, reduction=0.52),
        dict(sampler="nps", seed=0, best=0.92, step_time=0.008, reduction=0.48),
        dict(sampler="nps", seed=1, best=0.91, step_time=0.008, reduction=0.50),
        dict(sampler="topk", seed=0, best=0.80, step_time=0.005, reduction=0.5, lr=0.05),
        dict(sampler="topk", ratio=0.5, seed=0, best=0.70, status=RUNNING, epochs_done=1),
        dict(**LSTM, sampler="exact", seed=0, best=120.0, step_time=0.1),
        dict(**LSTM, sampler="topk", seed=0, best=130.0, step_time=0.05, reduction=0.5),
        dict(**LSTM, sampler="nps", seed=0, best=110.0, step_time=0.08, reduction=0.4),
    ]
    for number, spec in enumerate(specs):
        write_run(root / str(number), **spec)
    corrupt = write_run(root / "90", sampler="topk", seed=5)
    results_path(corrupt).write_text('{"status": "finished", "best_metric": ')
    missing = write_run(root / "91", sampler="nps", seed=5)
    results_path(missing).unlink()
    return root


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """See :func:`make_sweep`."""
    return make_sweep(tmp_path)


def table_for(tables: list[Table], model: str) -> Table:
    (table,) = [t for t in tables if t.model == model]
    return table


def row_for(table: Table, sampler: str, ratio: float = 0.3, status: str = FINISHED, overrides: str = "") -> Any:
    """The one row of ``table`` with this sampler, ratio, status and overrides substring."""
    rows = [
        r for r in table.rows
        if r.first.sampler == sampler and (sampler == "exact" or r.first.ratio == ratio)
        and r.first.status == status and overrides in r.overrides
    ]
    assert len(rows) == 1, [r.as_record() for r in table.rows]
    return rows[0]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich reads the terminal width from COLUMNS; keep table cells on one line."""
    monkeypatch.setenv("COLUMNS", "250")


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- loading


def test_collect_runs_reports_broken_dirs_and_keeps_the_others(sweep: Path) -> None:
    runs, problems = collect_runs([sweep])
    assert len(runs) == 11
    messages = {Path(p.path).relative_to(sweep).as_posix(): p.message for p in problems}
    assert set(messages) == {f"90/{RESULTS_FILE}", "91"}
    assert messages[f"90/{RESULTS_FILE}"].startswith("corrupt JSON: ")
    assert f"missing {RESULTS_FILE}" in messages["91"]
    assert all("\n" not in p.message for p in problems)


def test_outputs_root_is_searched_recursively_and_paths_deduplicated(sweep: Path) -> None:
    outputs = sweep.parent.parent
    write_run(outputs / "runs" / "2024-01-02_10-00-00", sampler="topk", seed=0, best=0.5)
    runs, _ = collect_runs([outputs, sweep, sweep / "0"])
    assert len(runs) == 12


def test_statuses_running_stale_and_incomplete(tmp_path: Path) -> None:
    write_run(tmp_path / "short", status=FINISHED, epochs_done=2, epochs_planned=5)
    write_run(tmp_path / "live", status=RUNNING, epochs_done=1)
    stale = write_run(tmp_path / "stale", status=RUNNING, epochs_done=1)
    old = time.time() - 2 * 3600
    os.utime(results_path(stale), (old, old))
    write_run(tmp_path / "bad", status=FAILED, best=None, epochs_done=0, error="CUDA out of memory")
    status = {Path(r.path).name: r.status for r in collect_runs([tmp_path])[0]}
    assert status == {"short": "incomplete", "live": "running", "stale": "incomplete", "bad": "failed"}


def test_every_status_a_compared_run_can_show_has_a_style() -> None:
    from approxtrain.compare.console import STATUS_STYLES
    from approxtrain.compare.runs import STATUSES

    assert set(STATUSES) == {*SCHEMA_STATUSES, "incomplete"} == set(STATUS_STYLES)


def test_failed_run_and_corrupt_config_are_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "exact", sampler="exact", best=0.9)
    write_run(tmp_path / "oom", sampler="topk", best=None, status=FAILED, epochs_done=0, error="CUDA out of memory")
    bad_config = write_run(tmp_path / "badcfg", sampler="nps", best=0.85)
    (bad_config / ".hydra" / "config.yaml").write_text("model: [unclosed\n")
    not_object = write_run(tmp_path / "list", sampler="nps", seed=3)
    results_path(not_object).write_text("[1, 2]")
    code, out, _ = run_cli([str(tmp_path), "--no-report"], capsys)
    assert code == 0
    assert "failed" in out and "CUDA out of memory" in out
    assert "corrupt YAML, run kept without its config" in out and "expected a JSON object, got list" in out
    runs, problems = collect_runs([tmp_path])
    assert {Path(r.path).name for r in runs} == {"exact", "oom", "badcfg"}
    assert len(problems) == 2


def test_flatten_makes_dotted_keys_and_hashable_lists() -> None:
    flat = flatten({"model": {"name": "mlp"}, "layers": {"rules": [{"match": "fc*"}]}, "ratio": 0.3})
    assert flat == {"model.name": "mlp", "layers.rules": '[{"match": "fc*"}]', "ratio": 0.3}


def test_setting_key_ignores_approximation_bookkeeping_and_seed() -> None:
    base = {"model.name": "mlp", "trainer.device": "cpu", "trainer.optimizer.lr": 0.1, "seed": 0}
    approx = {**base, "sampler.name": "topk", "ratio": 0.3, "layers.name": "all", "resume": "x",
              "logger.project": "p", "dataset.num_workers": 4, "seed": 1}
    assert setting_key(base) == setting_key(approx)
    assert setting_key(base) != setting_key({**base, "trainer.device": "cuda"})
    assert setting_key(base) != setting_key({**base, "trainer.optimizer.lr": 0.2})


def test_varying_keys_hide_option_defaults_and_exact_ratio() -> None:
    configs = [
        {"sampler.name": "exact", "sampler.scale": False, "ratio": 0.3, "trainer.optimizer.lr": 0.1},
        {"sampler.name": "topk", "sampler.scale": False, "ratio": 0.3, "trainer.optimizer.lr": 0.1},
        {"sampler.name": "nps", "sampler.scale": True, "ratio": 0.3, "trainer.optimizer.lr": 0.1},
        {"sampler.name": "nps", "sampler.scale": True, "ratio": 0.5, "trainer.optimizer.lr": 0.1},
    ]
    assert varying_keys(configs) == ["sampler.name", "ratio"]


# --------------------------------------------------------------------------- rows


def test_tables_are_split_by_model_and_dataset(sweep: Path) -> None:
    tables = build_rows(collect_runs([sweep])[0])
    assert [(t.model, t.dataset, t.metric_name, t.higher_is_better) for t in tables] == [
        ("lstm", "ptb", "perplexity", False),
        ("mlp", "digits", "accuracy", True),
    ]
    mlp = table_for(tables, "mlp")
    assert [(r.first.sampler, r.first.status, len(r.rows)) for r in mlp.rows] == [
        ("exact", "finished", 2),
        ("nps", "finished", 2),
        ("topk", "finished", 1),
        ("topk", "finished", 2),
        ("topk", "running", 1),
    ]
    assert len(mlp.run_rows) == 8


def test_seed_aggregation_delta_and_speedup(sweep: Path) -> None:
    mlp = table_for(build_rows(collect_runs([sweep])[0]), "mlp")
    topk = row_for(mlp, "topk", overrides="trainer.optimizer.lr=0.1")
    record = topk.as_record()
    assert record["n"] == 2 and record["seeds"] == [0, 1]
    assert record["best_metric"] == pytest.approx(0.92)
    assert record["best_metric_std"] == pytest.approx(0.0282843, rel=1e-5)
    assert record["compute_reduction"] == pytest.approx(0.51)
    assert record["baseline_metric"] == pytest.approx(0.94)
    assert record["delta"] == pytest.approx(-0.02)
    assert record["step_time_s"] == pytest.approx(0.0055)
    assert record["speedup"] == pytest.approx(0.011 / 0.0055)
    assert record["epochs"] == "3/3"
    assert record["overrides"] == "sampler=topk ratio=0.3 trainer.optimizer.lr=0.1"
    exact = row_for(mlp, "exact")
    assert exact.as_record()["delta"] == pytest.approx(0.0) and exact.speedup == pytest.approx(1.0)


def test_per_run_rows_match_the_baseline_of_the_same_seed(sweep: Path) -> None:
    mlp = table_for(build_rows(collect_runs([sweep])[0]), "mlp")
    by_dir = {Path(r.run.path).name: r for r in mlp.run_rows}
    assert [Path(p).name for p in by_dir["3"].baseline.paths] == ["1"]
    assert by_dir["3"].delta == pytest.approx(0.90 - 0.93)
    assert by_dir["3"].speedup == pytest.approx(0.012 / 0.006)


def test_run_with_other_settings_gets_no_baseline(sweep: Path) -> None:
    mlp = table_for(build_rows(collect_runs([sweep])[0]), "mlp")
    other = row_for(mlp, "topk", overrides="trainer.optimizer.lr=0.05")
    assert other.baseline.paths == [] and other.delta is None and other.speedup is None
    assert "no exact baseline with the same settings and seed" in other.notes


def test_partial_seed_coverage_is_noted(tmp_path: Path) -> None:
    write_run(tmp_path / "e0", sampler="exact", seed=0, best=0.9)
    write_run(tmp_path / "t0", sampler="topk", seed=0, best=0.8)
    write_run(tmp_path / "t1", sampler="topk", seed=1, best=0.6)
    (table,) = build_rows(collect_runs([tmp_path])[0])
    topk = row_for(table, "topk")
    assert topk.delta == pytest.approx(0.7 - 0.9)
    assert "baseline for 1 of 2 seeds" in topk.notes


def test_perplexity_direction(sweep: Path) -> None:
    lstm = table_for(build_rows(collect_runs([sweep])[0]), "lstm")
    assert row_for(lstm, "topk").delta == pytest.approx(10.0)
    assert row_for(lstm, "nps").delta == pytest.approx(-10.0)
    from approxtrain.compare.formatting import delta_is_better

    assert delta_is_better(row_for(lstm, "nps")) is True
    assert delta_is_better(row_for(lstm, "topk")) is False


def test_pareto_front_respects_direction() -> None:
    points = [(0.0, 0.95), (0.5, 0.94), (0.5, 0.90), (0.3, 0.80)]
    assert pareto_front(points, higher_is_better=True) == [0, 1]
    perplexity = [(0.0, 120.0), (0.4, 110.0), (0.5, 130.0), (0.2, 125.0)]
    assert pareto_front(perplexity, higher_is_better=False) == [1, 2]


# --------------------------------------------------------------------------- CLI and report


def test_cli_table_and_report(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli([str(sweep)], capsys)
    assert code == 0
    assert "mlp / digits: accuracy (higher is better)" in out
    assert "lstm / ptb: perplexity (lower is better)" in out
    assert "no baseline" in out and "corrupt JSON" in out and f"missing {RESULTS_FILE}" in out
    report = sweep / "report"
    assert f"report written to {report}" in out
    markdown = (report / "report.md").read_text()
    assert "## mlp / digits" in markdown and "## Problems (2)" in markdown and "pareto.png" in markdown
    for name in ("pareto.png", "curves.png"):
        data = (report / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        import matplotlib.image

        assert matplotlib.image.imread(report / name).ndim == 3
    lines = (report / "runs.csv").read_text().splitlines()
    assert len(lines) == 1 + 11 + 2


def test_a_report_link_in_the_run_dir_is_refused(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A ``report`` symlink would send the report to its target: refused in one line, nothing written there."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (sweep / "report").symlink_to(elsewhere)
    code, out, err = run_cli([str(sweep)], capsys)
    assert code == 2 and f"{sweep / 'report'} is a symbolic link (to {elsewhere})" in err, err
    assert list(elsewhere.iterdir()) == []


def test_links_inside_the_report_dir_are_replaced_not_followed(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    (sweep / "report").mkdir()
    for name in ("report.md", "runs.csv", "pareto.png"):
        (sweep / "report" / name).symlink_to(victim)
    code, _, _ = run_cli([str(sweep)], capsys)
    assert code == 0 and victim.read_text() == "keep me"
    for name in ("report.md", "runs.csv", "pareto.png"):
        assert not (sweep / "report" / name).is_symlink() and (sweep / "report" / name).stat().st_size > 0
    assert not list((sweep / "report").glob(".*.tmp"))


def test_report_is_not_rescanned_as_runs(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli([str(sweep)], capsys)[0] == 0
    runs, problems = collect_runs([sweep])
    assert len(runs) == 11 and len(problems) == 2


def test_cli_json_output(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli([str(sweep), "--format", "json"], capsys)
    assert code == 0
    document = json.loads(out)
    assert {t["model"] for t in document["tables"]} == {"mlp", "lstm"}
    assert len(document["runs"]) == 11
    assert {Path(p["path"]).name for p in document["problems"]} == {RESULTS_FILE, "91"}
    assert not (sweep / "report").exists()  # machine formats write a report only with --out


def test_cli_csv_output_and_explicit_out(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "my_report"
    code, out, err = run_cli([str(sweep), "--format", "csv", "--out", str(out_dir)], capsys)
    assert code == 0 and f"report written to {out_dir}" in err
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 13
    assert sum(row["status"] == "broken" for row in rows) == 2
    assert (out_dir / "report.md").is_file() and (out_dir / "pareto.png").is_file()


def test_cli_markdown_filter_and_sort(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(sweep), "--format", "md", "--filter", "model=mlp", "--filter", "sampler=exact,topk", "--sort", "delta"]
    code, out, _ = run_cli(args, capsys)
    assert code == 0
    assert "lstm" not in out.split("## Problems")[0] and "| nps |" not in out
    table_lines = [line for line in out.splitlines() if line.startswith("| topk") or line.startswith("| exact")]
    assert [line.split("|")[6].strip() for line in table_lines] == ["-0.2500", "-0.0200", "baseline", "no baseline"]


def test_filter_on_dotted_config_key_keeps_baselines_for_delta(sweep: Path) -> None:
    from approxtrain.compare.selection import apply_filters, parse_filter

    runs, _ = collect_runs([sweep])
    filters = ["model=mlp", "sampler=topk", "trainer.optimizer.lr=0.1", "ratio=0.30"]
    chosen = apply_filters(runs, [parse_filter(text) for text in filters])
    (table,) = build_rows(runs, chosen)
    assert [r.first.status for r in table.rows] == ["finished"]
    assert table.rows[0].delta == pytest.approx(-0.02)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "no PATH given"),
        (["/does/not/exist"], "path does not exist: /does/not/exist"),
        (["{sweep}", "--filter", "sampler"], "bad --filter 'sampler'"),
        (["{sweep}", "--filter", "samplr=topk"], "unknown --filter key 'samplr'; allowed: model"),
        (["{sweep}", "--sort", "accuracy"], "unknown --sort key 'accuracy'; allowed: sampler, ratio"),
        (["{sweep}", "--format", "xml"], "invalid choice: 'xml'"),
        (["{sweep}", "--wandb", "e/p"], "not both"),
        (["--wandb", "justproject"], "bad --wandb 'justproject': expected ENTITY/PROJECT"),
        (["{sweep}", "--group", "g"], "--group 'g' needs --wandb"),
        (["{sweep}", "--figure-format", "pdf,jpg"], "bad --figure-format 'pdf,jpg'; allowed: png, pdf, svg"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    sweep: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    code, out, err = run_cli([a.format(sweep=sweep) for a in args], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("approxtrain-compare: error: ") and needle in err


def test_empty_folder_is_reported_not_fatal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli([str(tmp_path), "--no-report"], capsys)
    assert code == 0 and "No runs to compare" in out and "no run dirs found" in out


def test_narrow_console_moves_overrides_under_the_table(sweep: Path) -> None:
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    print_sweep_table(sweep, console=Console(file=buffer, width=100))
    text = buffer.getvalue()
    assert "#2 (n=2): sampler=nps ratio=0.3 trainer.optimizer.lr=0.1" in text
    # The legend, note and problem lines are soft-wrapped (left to the terminal); the table must fit.
    table_lines = [line for line in text.splitlines()
                   if not line.startswith(("  #", "  note: ", "  warning: ", "  95 % interval: "))
                   and str(sweep) not in line]
    assert max(len(line) for line in table_lines) <= 100


def test_print_sweep_table_for_the_training_cli(sweep: Path) -> None:
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    print_sweep_table(sweep, console=Console(file=buffer, width=250))
    text = buffer.getvalue()
    assert "mlp / digits" in text and "baseline" in text and "2 problem(s)" in text


def test_json_and_csv_functions_parse(sweep: Path) -> None:
    runs, problems = collect_runs([sweep])
    tables = build_rows(runs)
    assert json.loads(to_json(tables, problems))["problems"]
    assert to_csv(tables, problems).splitlines()[0].startswith("path,status,model")


# --------------------------------------------------------------------------- W&B source


class FakeWandbRun:
    """What the public ``wandb.Api().runs()`` yields, reduced to the attributes we read."""

    def __init__(self, name: str, group: str, state: str, config: dict[str, Any], summary: dict[str, Any],
                 history: list[dict[str, Any]]) -> None:
        self.name, self.group, self.state = name, group, state
        self.config, self.summary, self._history = config, summary, history

    def history(self, samples: int = 500, keys: list[str] | None = None, pandas: bool = True) -> list[dict[str, Any]]:
        assert pandas is False  # pandas is not a dependency
        return [row for row in self._history if not keys or all(key in row for key in keys)]


def fake_wandb_run(name: str, sampler: str, seed: int, best: float, step: float, group: str = "sweep-1",
                   state: str = "finished", ratio: float = 0.3) -> FakeWandbRun:
    """A run as approxtrain's W&B logger records it: the config nested as Hydra composed it,
    results.json scalars in the summary (the schema's SUMMARY_KEYS, plus W&B's own ``_step``),
    one history row per epoch (``test/accuracy``) among per-step rows, each at its optimizer
    step. A crashed run never wrote its end."""
    config = {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "sampler": {"name": sampler, "scale": False},
              "ratio": ratio, "seed": seed, "trainer": {"epochs": 2, "device": "cpu", "optimizer": {"lr": 0.001}},
              "logger": {"group": None}, "layers": {"name": "paper", "rules": [{"type": "Linear"}]},
              "_wandb": {"cli_version": "0.31.0"}}
    status = {"finished": FINISHED, "failed": FAILED}.get(state, RUNNING)
    results = Results(model="mlp", dataset="digits", sampler=sampler, ratio=ratio, seed=seed, layers_rule_set="paper",
                      status=status, best_metric=best, test_metric_at_best=best, selected_on="validation",
                      final_metric=best,
                      compute_reduction=0.0 if sampler == "exact" else 0.5, planned_compute_reduction=0.5,
                      wall_time_s=3.0, step_time_s=step, steps=58, device="cpu",
                      error="diverged" if status == FAILED else None)
    summary = {**summary_of(results), "_step": 58}
    history = [{"_step": 29, "epoch": 1, "test/accuracy": best - 0.05}, {"_step": 40, "epoch": 2, "train/loss": 0.3},
               {"_step": 58, "epoch": 2, "test/accuracy": best}]
    return FakeWandbRun(name, group, state, config, summary, history)


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Install a fake ``wandb`` module whose ``Api`` serves canned runs; records the calls."""
    calls: dict[str, Any] = {}
    runs = [
        fake_wandb_run("exact-s0", "exact", 0, 0.95, 0.010),
        fake_wandb_run("exact-s1", "exact", 1, 0.93, 0.012),
        fake_wandb_run("topk-s0", "topk", 0, 0.94, 0.005),
        fake_wandb_run("topk-s1", "topk", 1, 0.90, 0.006),
        fake_wandb_run("nps-s0", "nps", 0, 0.92, 0.008, state="crashed"),
        fake_wandb_run("uniform-s0", "topk", 0, 0.50, 0.008, state="failed", ratio=0.1),
        fake_wandb_run("other-sweep", "topk", 0, 0.10, 0.005, group="sweep-2"),
    ]

    class FakeApi:
        def __init__(self, timeout: int | None = None) -> None:
            calls["timeout"] = timeout

        def runs(self, path: str, filters: dict[str, Any] | None = None) -> list[FakeWandbRun]:
            calls["path"], calls["filters"] = path, filters
            return runs  # a real server applies the filter; the client must cope either way

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=FakeApi))
    return calls


def test_wandb_source_builds_the_same_table(fake_wandb: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--wandb", "team/approxtrain", "--group", "sweep-1", "--format", "json"], capsys)
    assert code == 0
    assert fake_wandb["path"] == "team/approxtrain" and fake_wandb["filters"] == {"group": "sweep-1"}
    document = json.loads(out)
    (table,) = document["tables"]
    rows = {(r["sampler"], r["status"]): r for r in table["rows"]}
    assert set(rows) == {("exact", "finished"), ("topk", "finished"), ("nps", "failed"), ("topk", "failed")}
    assert rows[("topk", "failed")]["notes"] == ["seed 0: diverged"]
    topk = rows[("topk", "finished")]
    assert topk["n"] == 2 and topk["best_metric"] == pytest.approx(0.92)
    assert topk["delta"] == pytest.approx(-0.02) and topk["speedup"] == pytest.approx(2.0)
    assert topk["epochs"] == "2/2"
    assert rows[("nps", "failed")]["notes"] == ["seed 0: W&B state crashed"]
    assert all(not r["path"].endswith("other-sweep") for r in document["runs"])
    assert {r["path"] for r in document["runs"]} >= {"wandb:team/approxtrain/topk-s0"}


def test_wandb_runs_have_curves(fake_wandb: dict[str, Any]) -> None:
    from approxtrain.compare.wandb_source import fetch_wandb_runs

    runs, problems = fetch_wandb_runs("team/approxtrain", "sweep-1")
    assert not problems
    assert runs[0].curve == [(1, pytest.approx(runs[0].best_metric - 0.05)), (2, runs[0].best_metric)]


def test_wandb_epochs_done_counts_history_rows_a_diverged_epoch_included() -> None:
    from approxtrain.compare.wandb_source import convert_run

    api_run = fake_wandb_run("topk-s0", "topk", 0, 0.94, 0.005)
    api_run._history[-1]["test/accuracy"] = float("nan")  # epoch 2 diverged
    run = convert_run(api_run, "wandb:team/approxtrain/topk-s0")
    assert run.epochs_done == 2 and run.epochs_planned == 2 and run.status == "finished"
    assert run.curve == [(1, pytest.approx(0.89))]


def test_wandb_runs_logged_before_the_named_metrics_still_read() -> None:
    """Runs logged with dotted config keys and a ``test_metric`` history read the same."""
    from approxtrain.compare.matching import flatten
    from approxtrain.compare.wandb_source import convert_run

    api_run = fake_wandb_run("topk-s0", "topk", 0, 0.94, 0.005)
    api_run.config = flatten(api_run.config)
    api_run._history = [{("test_metric" if key == "test/accuracy" else key): value for key, value in row.items()}
                        for row in api_run._history]
    run = convert_run(api_run, "wandb:team/approxtrain/topk-s0")
    assert run.curve == [(1, pytest.approx(0.89)), (2, 0.94)] and run.config["sampler.name"] == "topk"


def test_wandb_unreachable_is_one_line_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class OfflineApi:
        def __init__(self, timeout: int | None = None) -> None:
            raise ConnectionError("Failed to resolve 'api.wandb.ai'\nretrying...")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=OfflineApi))
    code, out, err = run_cli(["--wandb", "team/approxtrain"], capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "cannot read W&B project 'team/approxtrain'" in err and "ConnectionError" in err

"""approxtrain-compare's rows and figures: which runs pool as seeds, fixed sampler colours,
seed spread, the step-time noise warning and the figure formats (hand-built run dirs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from test_compare import PNG_SIGNATURE, row_for, run_cli, write_run

from approxtrain.compare import build_rows, collect_runs, to_markdown
from approxtrain.compare.formatting import COLUMNS
from approxtrain.compare.plots import FIGURES, curve_stats
from approxtrain.compare.style import EXACT_COLOR, sampler_color
from approxtrain.compare.table import Table
from approxtrain.compare.timing import NOISY_STEP_TIME_CV, variation
from approxtrain.sampling import POLICIES


def set_config_key(run_dir: Path, dotted: str, value: Any) -> None:
    """Add or change one key of a run's saved ``.hydra/config.yaml`` (a key another part of
    the project may add to the config later, such as ``schedule`` or ``trainer.distributed``)."""
    path = run_dir / ".hydra" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    path.write_text(yaml.safe_dump(config))


def only_table(path: Path) -> Table:
    (table,) = build_rows(collect_runs([path])[0])
    return table


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")


# --------------------------------------------------------------------------- which runs are one row


def test_exact_runs_differing_only_in_ratio_are_one_experiment_not_extra_seeds(tmp_path: Path) -> None:
    write_run(tmp_path / "e03s0", sampler="exact", ratio=0.3, seed=0, best=0.90)
    write_run(tmp_path / "e05s0", sampler="exact", ratio=0.5, seed=0, best=0.90)
    write_run(tmp_path / "e03s1", sampler="exact", ratio=0.3, seed=1, best=0.94)
    write_run(tmp_path / "t03s0", sampler="topk", ratio=0.3, seed=0, best=0.85)
    table = only_table(tmp_path)
    exact = row_for(table, "exact")
    record = exact.as_record()
    assert record["n"] == 2 and record["runs"] == 3 and record["seeds"] == [0, 1]
    assert record["best_metric"] == pytest.approx(0.92)  # seed 0 counts once, not twice
    assert record["best_metric_std"] == pytest.approx(0.0282843, rel=1e-5)
    assert "seed 0: 2 runs that differ only in ratio 0.3, 0.5, which exact ignores, are one experiment, " \
           "averaged as one seed" in exact.notes
    topk = row_for(table, "topk")
    assert sorted(Path(p).name for p in topk.baseline.paths) == ["e03s0", "e05s0"]
    assert topk.delta == pytest.approx(-0.05)


def test_one_seed_run_twice_shows_no_zero_spread(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "a", sampler="exact", ratio=0.3, seed=0, best=0.9)
    write_run(tmp_path / "b", sampler="exact", ratio=0.5, seed=0, best=0.9)
    exact = row_for(only_table(tmp_path), "exact")
    assert exact.n == 1 and exact.best_metric.std is None
    code, out, _ = run_cli([str(tmp_path), "--format", "md"], capsys)
    assert code == 0
    (line,) = [line for line in out.splitlines() if line.startswith("| exact")]
    assert "±" not in line and line.split("|")[COLUMNS.index("n") + 1].strip() == "1"


@pytest.mark.parametrize(
    ("key", "values"),
    [
        ("brand_new_group.knob", (1, 2)),  # a key nobody knows yet
        ("trainer.distributed.world_size", (1, 2)),
        ("sampler.k_rounding", ("nearest", "floor")),
        ("schedule.name", ("constant", "warmup")),
    ],
)
def test_any_other_key_difference_keeps_sampled_runs_apart(tmp_path: Path, key: str, values: tuple) -> None:
    for seed, value in enumerate(values):
        set_config_key(write_run(tmp_path / f"topk{seed}", sampler="topk", seed=0), key, value)
    table = only_table(tmp_path)
    assert sorted(row.n for row in table.rows) == [1, 1]
    assert all(f"{key.removesuffix('.name')}=" in row.overrides for row in table.rows)


def test_a_setting_difference_keeps_exact_runs_apart_and_picks_the_baseline(tmp_path: Path) -> None:
    for world in (1, 2):
        set_config_key(write_run(tmp_path / f"exact{world}", sampler="exact", best=0.9 + world / 100),
                       "trainer.distributed.world_size", world)
        set_config_key(write_run(tmp_path / f"topk{world}", sampler="topk", best=0.8),
                       "trainer.distributed.world_size", world)
    table = only_table(tmp_path)
    assert [row.n for row in table.rows if row.is_exact] == [1, 1]
    by_world = {row.first.config["trainer.distributed.world_size"]: row for row in table.rows if not row.is_exact}
    assert by_world[2].delta == pytest.approx(0.8 - 0.92)


def test_exact_ignores_what_only_sampling_uses_and_sampled_runs_find_it(tmp_path: Path) -> None:
    """``sampler.*`` and ``schedule.*`` shape only sampled runs: exact runs that differ in
    them are one experiment, and a scheduled run's baseline is the plain exact run."""
    set_config_key(write_run(tmp_path / "e0", sampler="exact", seed=0), "sampler.k_rounding", "floor")
    set_config_key(write_run(tmp_path / "e1", sampler="exact", seed=0), "schedule.name", "warmup")
    set_config_key(write_run(tmp_path / "warm", sampler="topk", seed=0), "schedule.name", "warmup")
    table = only_table(tmp_path)
    (exact,) = [row for row in table.rows if row.is_exact]
    assert exact.n == 1 and len(exact.rows) == 2
    assert sorted(Path(p).name for p in row_for(table, "topk").baseline.paths) == ["e0", "e1"]


# --------------------------------------------------------------------------- colours and spread


def legend_colors(table: Table, figure_name: str) -> dict[str, str]:
    """Label -> hex colour of every legend entry a figure draws for ``table``."""
    figure = Figure()
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    FIGURES[figure_name](axes, table)
    colors = {}
    for handle, label in zip(*axes.get_legend_handles_labels()):
        line = handle[0] if isinstance(handle, tuple) or hasattr(handle, "lines") else handle
        colors[label.split()[0]] = to_hex(line.get_color())
    return colors


def test_a_sampler_has_the_same_colour_in_every_report(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for sampler in ("exact", "topk"):
        write_run(first / sampler, sampler=sampler, best=0.9)
    for name, sampler in (("a", "uniform"), ("b", "nps"), ("c", "topk"), ("d", "exact"), ("e", "bernoulli")):
        write_run(second / name, sampler=sampler, best=0.9)
    for figure_name in FIGURES:
        one, two = legend_colors(only_table(first), figure_name), legend_colors(only_table(second), figure_name)
        assert one["topk"] == two["topk"] == to_hex(sampler_color("topk"))
        assert one["exact"] == two["exact"] == to_hex(EXACT_COLOR)
        assert len({two[sampler] for sampler in POLICIES}) == 5  # five samplers, five colours


def test_every_policy_has_its_own_fixed_colour() -> None:
    colors = [to_hex(sampler_color(policy)) for policy in POLICIES]
    assert len(set(colors)) == len(POLICIES) and sampler_color("exact") == EXACT_COLOR
    assert sampler_color("my_sampler") == sampler_color("my_sampler")
    assert to_hex(sampler_color("my_sampler")) not in colors


def test_pareto_bars_are_the_intervals_and_curves_the_seed_spread(tmp_path: Path) -> None:
    for seed, (exact, topk) in enumerate(((0.95, 0.90), (0.93, 0.86))):
        write_run(tmp_path / f"e{seed}", sampler="exact", seed=seed, best=exact)
        write_run(tmp_path / f"t{seed}", sampler="topk", seed=seed, best=topk)
    table = only_table(tmp_path)
    epochs, stats = curve_stats(row_for(table, "topk"))
    assert epochs == [1, 2, 3] and stats[-1].mean == pytest.approx(0.88)
    assert stats[-1].std == pytest.approx(0.0282843, rel=1e-5)
    figure = Figure()
    FigureCanvasAgg(figure)
    pareto, curves = figure.add_subplot(2, 1, 1), figure.add_subplot(2, 1, 2)
    FIGURES["pareto"](pareto, table)
    FIGURES["curves"](curves, table)
    bars = {label.split()[0]: handle for handle, label in zip(*pareto.get_legend_handles_labels())}
    assert not bars["exact"].has_yerr and bars["topk"].has_yerr  # exact's spread is inside the rows' intervals
    # 2 seeds a side: the bootstrap interval [min - max, max - min] = [0.86 - 0.95, 0.90 - 0.93] from exact's 0.94
    (segment,) = bars["topk"].lines[2][-1].get_segments()
    assert [y for _, y in segment] == pytest.approx([0.94 - 0.09, 0.94 - 0.03])
    assert len(pareto.patches) == 0
    assert len(curves.collections) == 2  # one +-1 std band per row


# --------------------------------------------------------------------------- step-time noise


def test_steady_step_times_support_the_speedup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for seed in (0, 1):
        write_run(tmp_path / f"e{seed}", sampler="exact", seed=seed, epoch_step_times=[0.0100, 0.0102, 0.0099])
        write_run(tmp_path / f"t{seed}", sampler="topk", seed=seed, epoch_step_times=[0.0050, 0.0051, 0.0049])
    topk = row_for(only_table(tmp_path), "topk")
    assert topk.speedup_reliable is True and topk.step_time_cv < NOISY_STEP_TIME_CV
    assert not [note for note in topk.notes if "step time varies" in note]
    code, out, _ = run_cli([str(tmp_path), "--no-report"], capsys)
    assert code == 0 and "x?" not in out and "step time varies" not in out


@pytest.mark.parametrize("noisy", ["row", "baseline"])
def test_noisy_step_times_mark_the_speedup_unreliable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], noisy: str
) -> None:
    steady, loaded = [0.010, 0.010, 0.010], [0.010, 0.024, 0.007]
    write_run(tmp_path / "exact", sampler="exact", epoch_step_times=loaded if noisy == "baseline" else steady)
    write_run(tmp_path / "topk", sampler="topk", epoch_step_times=loaded if noisy == "row" else steady)
    table = only_table(tmp_path)
    topk = row_for(table, "topk")
    assert topk.speedup_reliable is False and topk.as_record()["speedup_reliable"] is False
    (note,) = [note for note in topk.notes if "step time varies" in note]
    assert ("this row" in note) == (noisy == "row") and ("its baseline" in note) == (noisy == "baseline")
    assert row_for(table, "exact").speedup_reliable is (noisy == "row")
    code, out, _ = run_cli([str(tmp_path), "--format", "md"], capsys)
    (line,) = [line for line in out.splitlines() if line.startswith("| topk")]
    assert line.split("|")[COLUMNS.index("speedup") + 1].strip().endswith("x?")
    assert "the speedup is unreliable (marked ?)" in out


def test_one_config_timed_in_two_sweeps_on_a_loaded_machine_is_flagged(tmp_path: Path) -> None:
    """The same runs, steady within each sweep, 2.79x in one and 0.68x in the other: pooled,
    the spread shows."""
    for sweep, (exact, topk) in {"idle": (0.0279, 0.0100), "loaded": (0.0068, 0.0100)}.items():
        write_run(tmp_path / sweep / "exact", sampler="exact", step_time=exact)
        write_run(tmp_path / sweep / "topk", sampler="topk", step_time=topk)
        assert row_for(only_table(tmp_path / sweep), "topk").speedup_reliable is True
    table = only_table(tmp_path)
    exact = row_for(table, "exact")
    assert exact.n == 1 and exact.step_time_cv > NOISY_STEP_TIME_CV
    assert row_for(table, "topk").speedup_reliable is False
    assert "step time varies" in to_markdown([table], [])


def test_variation_needs_two_samples() -> None:
    assert variation([0.01]) is None and variation([]) is None
    assert variation([1.0, 1.0]) == 0.0
    assert variation([1.0, 3.0]) == pytest.approx(2**0.5 / 2)


# --------------------------------------------------------------------------- files


def test_figures_as_png_pdf_and_svg_for_a_paper(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for sampler in ("exact", "topk", "nps"):
        write_run(tmp_path / "runs" / sampler, sampler=sampler)
    out = tmp_path / "report"
    code, _, _ = run_cli([str(tmp_path / "runs"), "--out", str(out), "--figure-format", "pdf,svg"], capsys)
    assert code == 0
    for name, axis_label in (("pareto", "compute reduction"), ("curves", "epoch")):
        assert (out / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF-")
        svg = (out / f"{name}.svg").read_text()
        assert "<svg" in svg and axis_label in svg  # text kept as text
        import matplotlib.image

        height, width, _ = matplotlib.image.imread(out / f"{name}.png").shape
        assert width >= 1300  # 6.75 in at 200 dpi
    plain = tmp_path / "plain"
    assert run_cli([str(tmp_path / "runs"), "--out", str(plain)], capsys)[0] == 0
    assert sorted(p.name for p in plain.iterdir()) == ["curves.png", "pareto.png", "report.md", "runs.csv"]


def test_figure_text_is_legible(tmp_path: Path) -> None:
    from matplotlib import rc_context

    from approxtrain.compare.plots import _figure
    from approxtrain.compare.style import RC_PARAMS

    for sampler in ("exact", "topk"):
        write_run(tmp_path / sampler, sampler=sampler)
    with rc_context(RC_PARAMS):
        for draw in FIGURES.values():
            figure = _figure([only_table(tmp_path)], draw)
            figure.canvas.draw()
            sizes = [text.get_fontsize() for text in figure.findobj(lambda a: hasattr(a, "get_fontsize"))
                     if getattr(text, "get_text", lambda: "")()]
            assert sizes and min(sizes) >= 8

"""W&B that never stalls or ends a run: the reachability probe, the offline fallback, W&B errors
during training, and ANSI codes kept out of ``train.log``. No network: closed and silent
loopback ports, and a stand-in for the few ``wandb`` calls the logger makes."""

from __future__ import annotations

import json
import logging
import logging.config
import socket
import sys
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from approxtrain.cli.wandb_logger import (
    WandbCallback,
    finish_within,
    open_run,
    quiet_wandb_analytics,
    reachable,
    run_config,
    run_name,
    run_tags,
    wandb_callback,
)
from approxtrain.run.trainer import Trainer

DIGITS = ("model=mlp", "dataset=digits", "dataset.batch_size=200", "trainer.log_every_n_steps=3", "logger=wandb")


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL nothing listens on: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_server_url():
    """A loopback URL that accepts connections and never answers (a network that swallows packets)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture
def answering_server_url():
    """A loopback HTTP server answering 404 to everything."""

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def stalling_server():
    """A loopback W&B server that answers HEAD and GET at once and never answers a POST (W&B's API calls
    and telemetry); yields (url, requests), each request as (wall-clock time, method, path)."""
    requests: list[tuple[float, str, str]] = []
    released = threading.Event()

    class Stalling(BaseHTTPRequestHandler):
        def answer(self) -> None:
            requests.append((time.time(), self.command, self.path))
            self.send_response(200)
            self.end_headers()

        do_HEAD = do_GET = answer  # noqa: N815 - the method names http.server dispatches to

        def do_POST(self) -> None:
            requests.append((time.time(), self.command, self.path))
            released.wait(120)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", requests
    released.set()
    server.shutdown()
    server.server_close()


class FakeConfig(dict):
    """A W&B run's ``config``: ``update`` takes wandb's ``allow_val_change``."""

    def update(self, values: dict, allow_val_change: bool = False) -> None:
        super().update(values)


class FakeRun:
    """A W&B run; ``log`` raises once ``fail_after`` rows were logged."""

    def __init__(self, mode: str, sync_dir: Path, fail_after: int | None) -> None:
        self.settings = SimpleNamespace(mode=mode, sync_dir=str(sync_dir))
        self.id = "fakerun1"
        self.rows: list[dict] = []
        self.saved: list[str] = []
        self.steps: list[int] = []
        self.summary: dict = {}
        self.config = FakeConfig()
        self.metric_summaries: dict[str, str] = {}
        self.finished: int | None = None
        self.fail_after = fail_after

    def define_metric(self, name: str, summary: str) -> None:
        self.metric_summaries[name] = summary

    def log(self, row: dict, step: int) -> None:
        if self.fail_after is not None and len(self.rows) >= self.fail_after:
            raise RuntimeError("the W&B service died")
        self.rows.append(row)
        self.steps.append(step)

    def save(self, glob_str: str, base_path: str, policy: str) -> None:
        self.saved.append(str(Path(glob_str).relative_to(base_path)))

    def finish(self, exit_code: int = 0) -> None:
        self.finished = exit_code


class FakeWandb:
    """The ``wandb`` calls the logger makes; ``init`` raises for the modes in ``fails``."""

    def __init__(self, base_url: str, run_dir: Path, fails: tuple[str, ...] = (), fail_after: int | None = None) -> None:
        self.base_url, self.run_dir, self.fails, self.fail_after = base_url, run_dir, fails, fail_after
        self.inits: list[tuple[str | None, dict | None]] = []
        self.runs: list[FakeRun] = []
        self.teardowns = 0

    def teardown(self) -> None:
        self.teardowns += 1

    def setup(self) -> SimpleNamespace:
        return SimpleNamespace(settings=SimpleNamespace(base_url=self.base_url))

    def Settings(self, **settings) -> dict:  # noqa: N802 - wandb's name
        return settings

    def Table(self, columns: list, data: list) -> tuple:  # noqa: N802 - wandb's name
        return columns, data

    def init(self, mode: str | None = None, settings: dict | None = None, **init_args) -> FakeRun:
        self.inits.append((mode, settings))
        if mode in self.fails:
            raise ConnectionError(f"cannot start a {mode} run")
        run = FakeRun(mode or "from WANDB_MODE", self.run_dir / "wandb" / f"{mode}-run-1", self.fail_after)
        self.runs.append(run)
        return run


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


# ---------------------------------------------------------------------------------------------- reachability


def test_a_refused_connection_is_unreachable_at_once(closed_port_url):
    started = time.perf_counter()
    assert not reachable(closed_port_url, timeout_s=5)
    assert time.perf_counter() - started < 2


def test_a_silent_server_is_unreachable_after_the_timeout(silent_server_url):
    started = time.perf_counter()
    assert not reachable(silent_server_url, timeout_s=1)
    assert 0.9 < time.perf_counter() - started < 2


def test_any_http_answer_counts_as_reachable(answering_server_url):
    assert reachable(answering_server_url, timeout_s=5)


# ---------------------------------------------------------------------------------------------- opening the run


def test_online_without_a_server_logs_offline_in_one_line(api_key, silent_server_url, tmp_path, caplog):
    wandb = FakeWandb(silent_server_url, tmp_path)
    quiet_wandb_analytics()  # imports the real wandb once (a run has it imported already): not the bound under test
    started = time.perf_counter()
    with caplog.at_level(logging.INFO):
        run = open_run(wandb, "online", 1, project="p", dir=str(tmp_path))
    assert time.perf_counter() - started < 2
    assert [mode for mode, _ in wandb.inits] == ["offline"] and run is wandb.runs[0]
    where = run.settings.sync_dir
    assert warnings_of(caplog) == [f"W&B: cannot reach {silent_server_url} within 1 s (logger.mode=online); "
                                   f"logging offline to {where} (upload later with `wandb sync {where}`)"]


def test_auto_mode_with_a_key_tries_online_with_the_bounded_timeout(api_key, answering_server_url, tmp_path, caplog):
    wandb = FakeWandb(answering_server_url, tmp_path)
    with caplog.at_level(logging.INFO):
        run = open_run(wandb, "auto", 2.5, project="p")
    ((mode, settings),) = wandb.inits
    assert mode == "online" and run.settings.mode == "online"
    assert 1 <= settings["init_timeout"] <= 2.5 and settings["finish_timeout"] == 2.5  # the probe's time is taken off
    assert not caplog.records


def test_an_online_start_that_fails_logs_offline(api_key, answering_server_url, tmp_path, caplog):
    wandb = FakeWandb(answering_server_url, tmp_path, fails=("online",))
    with caplog.at_level(logging.INFO):
        run = open_run(wandb, "auto", 2, project="p")
    assert [mode for mode, _ in wandb.inits] == ["online", "offline"] and run.settings.mode == "offline"
    assert wandb.teardowns == 1  # the failed online start's service ended before the offline run starts
    (line,) = warnings_of(caplog)
    assert line.startswith(f"W&B: no online run at {answering_server_url} (ConnectionError: cannot start a online run); "
                           f"logging offline to {run.settings.sync_dir}")


def test_wandb_mode_wins_and_online_from_it_falls_back_too(monkeypatch, closed_port_url, tmp_path, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb = FakeWandb(closed_port_url, tmp_path)
    open_run(wandb, "online", 2, project="p")
    assert wandb.inits == [(None, None)]  # wandb reads WANDB_MODE itself; no probe, no fallback
    monkeypatch.setenv("WANDB_MODE", "online")
    wandb = FakeWandb(closed_port_url, tmp_path)
    with caplog.at_level(logging.INFO):
        run = open_run(wandb, "auto", 2, project="p")
    assert [mode for mode, _ in wandb.inits] == ["offline"] and run.settings.mode == "offline"
    (line,) = warnings_of(caplog)
    assert line.startswith(f"W&B: cannot reach {closed_port_url} within 2 s (WANDB_MODE=online); logging offline")


def test_when_offline_fails_too_training_goes_on_without_wandb(api_key, closed_port_url, tmp_path, caplog):
    wandb = FakeWandb(closed_port_url, tmp_path, fails=("online", "offline"))
    with caplog.at_level(logging.INFO):
        assert open_run(wandb, "online", 2, project="p") is None
    (line,) = warnings_of(caplog)
    assert "offline logging failed too (ConnectionError: cannot start a offline run)" in line
    assert line.endswith("training goes on without W&B")


def test_finishing_waits_at_most_the_budget_left(api_key, answering_server_url, run_cfg, run_dir, monkeypatch):
    """An online run gets what its start left of logger.init_timeout_s to finish; a finish that hangs
    is left behind then (wandb's finish_timeout ends it), one that raises still raises."""
    wandb = FakeWandb(answering_server_url, run_dir)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    callback = WandbCallback(run_cfg(*DIGITS, "logger.mode=online", "logger.init_timeout_s=2"), run_dir, group=None)
    assert 1 <= callback.finish_budget_s <= 2
    hanging = SimpleNamespace(finish=lambda exit_code: time.sleep(30))
    started = time.perf_counter()
    assert not finish_within(hanging, 0.5)
    assert time.perf_counter() - started < 2
    assert finish_within(SimpleNamespace(finish=lambda exit_code: None), 0.5)

    def broken(exit_code):
        raise RuntimeError("the W&B service died")

    with pytest.raises(RuntimeError, match="service died"):
        finish_within(SimpleNamespace(finish=broken), 0.5)


@pytest.mark.slow
def test_a_server_that_hangs_posts_costs_at_most_the_budget_and_gets_nothing_after_the_fallback(cli, tmp_path, stalling_server):
    """A server that answers HEAD but never answers W&B's posts: start and finish together stay within
    logger.init_timeout_s (plus starting W&B), the run finishes, and after the fallback to offline W&B
    sends the server nothing (no telemetry) -- also not at exit."""
    url, requests = stalling_server
    run_dir, home = tmp_path / "run", tmp_path / "home"
    env = {"HOME": str(home), "WANDB_CONFIG_DIR": str(home / ".config" / "wandb"), "WANDB_API_KEY": "0" * 40,
           "WANDB_BASE_URL": url}
    process = cli("model=mlp", "dataset=digits", "trainer.epochs=1", "trainer.num_workers=0", "trainer.device=cpu",
                  "logger=wandb", "logger.mode=online", "logger.init_timeout_s=3", f"hydra.run.dir={run_dir}", env=env, timeout=120)
    ended = time.time()
    assert process.returncode == 0, process.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"
    (fallback,) = [line for line in (run_dir / "train.log").read_text().splitlines() if "logging offline to" in line]
    assert f"W&B: no online run at {url} (" in fallback or f"W&B: cannot reach {url} within 3 s" in fallback
    fallback_at = datetime.strptime(fallback[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    job_started = (run_dir / ".hydra" / "config.yaml").stat().st_mtime
    assert fallback_at - job_started < 3 + 12  # the budget, plus importing and starting W&B (W&B alone: 90 s)
    assert ended - (run_dir / "results.json").stat().st_mtime < 3 + 7  # finishing and exiting (was +25 s of telemetry)
    assert any(method == "POST" for _, method, _ in requests), "the server was never asked: the test tests nothing"
    assert [request for request in requests if request[0] > fallback_at] == []


# ---------------------------------------------------------------------------------------------- during training


def test_a_wandb_error_during_training_ends_the_logging_not_the_run(
        api_key, closed_port_url, run_cfg, run_dir, monkeypatch, caplog):
    wandb = FakeWandb(closed_port_url, run_dir, fail_after=2)  # the layer plan, one step row, then the service dies
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    with caplog.at_level(logging.INFO):
        callback = WandbCallback(run_cfg(*DIGITS), run_dir, group=None)
        results = Trainer(run_cfg(*DIGITS), run_dir, [callback]).fit()
    assert results.status == "finished"
    (run,) = wandb.runs
    assert len(run.rows) == 2 and run.finished is None and callback.run is None
    assert warnings_of(caplog)[1:] == ["W&B: on_step failed (RuntimeError: the W&B service died); training goes on without W&B"]


@pytest.mark.parametrize(("value", "shown"), [(0, "0"), (-3, "-3"), ("soon", "'soon'"), (True, "True"), (float("inf"), "inf")])
def test_a_bad_init_timeout_is_one_line(value, shown, run_cfg, run_dir):
    cfg = run_cfg("logger=wandb")
    cfg["logger"]["init_timeout_s"] = value
    with pytest.raises(ValueError, match=r"^logger\.init_timeout_s=.* is invalid; allowed: a number of seconds > 0") as error:
        WandbCallback(cfg, run_dir, group=None)
    assert f"init_timeout_s={shown} " in str(error.value)


# ---------------------------------------------------------------------------------------------- what a run logs


def test_config_is_nested_as_composed_with_each_axis_once(run_cfg):
    cfg = run_cfg(*DIGITS)
    config = run_config(cfg)
    assert config["model"]["name"] == "mlp" and config["sampler"]["name"] == "topk" and config["ratio"] == 0.5
    assert config["layers"]["rules"] == cfg["layers"]["rules"]  # a list of rules, not a Python repr
    assert config["trainer"]["optimizer"] == cfg["trainer"]["optimizer"]
    assert not any(isinstance(key, str) and "." in key for key in config), "flat dotted keys next to the nested ones"
    assert "paper_rules" not in config["model"] and "paper_rules" in cfg["model"]


def test_tags_and_name_leave_the_ratio_out_of_an_exact_run(run_cfg):
    sampled, exact = run_cfg(*DIGITS, "ratio=0.3"), run_cfg(*DIGITS, "sampler=exact", "logger.tags=[baseline]")
    assert run_tags(sampled) == ["model:mlp", "dataset:digits", "sampler:topk", "ratio:0.3"]
    assert run_tags(exact) == ["model:mlp", "dataset:digits", "sampler:exact", "baseline"]
    assert (run_name(sampled), run_name(exact)) == ("mlp-digits-topk-0.3-s0", "mlp-digits-exact-s0")


def test_without_wandb_the_run_logs_as_logger_none_with_a_hint(run_cfg, run_dir, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with caplog.at_level(logging.INFO):
        assert wandb_callback(run_cfg(*DIGITS), run_dir, group=None) is None
    (line,) = warnings_of(caplog)
    assert line.startswith("W&B: cannot import wandb (") and line.endswith("logging as logger=none (install it: pip install wandb)")


def test_rows_are_logged_at_the_optimizer_step_with_named_metrics(api_key, closed_port_url, run_cfg, run_dir, monkeypatch):
    wandb = FakeWandb(closed_port_url, run_dir)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    cfg = run_cfg(*DIGITS, "logger.log_model=false")
    callback = WandbCallback(cfg, run_dir, group=None)
    results = Trainer(cfg, run_dir, [callback]).fit()
    (run,) = wandb.runs
    plan, *rows = run.rows
    assert "layer_plan" in plan and all("epoch" in row for row in run.rows)
    (epoch,) = [row for row in rows if "test/accuracy" in row]
    assert epoch["test/accuracy"] == results.test_metric_at_best and epoch["train/loss_epoch"] == results.epochs[0]["train_loss"]
    assert all(set(row) >= {"train/loss", "train/samples_per_s", "train/compute_reduction"} for row in rows if row is not epoch)
    steps_per_epoch = results.steps  # one epoch
    assert run.steps == [0, *range(3, steps_per_epoch, 3), steps_per_epoch, steps_per_epoch]  # log_every_n_steps=3
    assert run.saved == ["results.json"]  # no .hydra dir outside the CLI: only files that exist are saved
    assert (run_dir / "wandb" / "run_id").read_text() == run.id and run.finished == 0


def test_each_epoch_logs_the_validation_metric_and_the_summary_follows_the_epoch_chosen_on_it(
        api_key, closed_port_url, run_cfg, run_dir, monkeypatch):
    wandb = FakeWandb(closed_port_url, run_dir)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    cfg = run_cfg(*DIGITS, "logger.log_model=false", "trainer.epochs=3")
    callback = WandbCallback(cfg, run_dir, group=None)
    summaries = []  # the summary after each epoch's logging
    on_epoch = callback.on_epoch
    monkeypatch.setattr(callback, "on_epoch", lambda trainer, record: (on_epoch(trainer, record), summaries.append(dict(
        callback.run.summary))))
    results = Trainer(cfg, run_dir, [callback]).fit()
    (run,) = wandb.runs
    epoch_rows = [row for row in run.rows if "test/accuracy" in row]
    assert [row["val/accuracy"] for row in epoch_rows] == [epoch["val_metric"] for epoch in results.epochs]
    assert run.metric_summaries == {"val/accuracy": "max", "test/accuracy": "last"}  # the best test epoch is not chosen on test
    for done, summary in enumerate(summaries, start=1):
        history = results.epochs[:done]
        best = max(history, key=lambda epoch: epoch["val_metric"])  # the first of equals
        assert summary["best_epoch"] == best["epoch"] and summary["test_metric_at_best"] == best["test_metric"]
        assert summary["best_metric"] == best["val_metric"] and summary["selected_on"] == "validation"
    assert run.summary["test_metric_at_best"] == results.test_metric_at_best and run.summary["best_epoch"] == results.best_epoch


# ---------------------------------------------------------------------------------------------- train.log


def test_train_log_is_written_without_ansi_codes(compose_cfg, tmp_path):
    """The run's file handler (hydra.job_logging) strips colour, cursor and hyperlink codes; the console keeps them."""
    job_logging = compose_cfg().hydra.job_logging
    formatters = OmegaConf.to_container(job_logging.formatters, resolve=True)
    configurator = logging.config.DictConfigurator({})
    to_file = configurator.configure_formatter(formatters[job_logging.handlers.file.formatter])
    to_console = configurator.configure_formatter(formatters[job_logging.handlers.console.formatter])
    coloured = "\x1b[1;34mwandb\x1b[0m: \x1b]8;;https://wandb.ai\x1b\\run\x1b]8;;\x1b\\ \x1b[2K\x1b[1Adone"
    record = logging.LogRecord("approxtrain", logging.WARNING, __file__, 1, coloured, None, None)
    line = to_file.format(record)
    assert "\x1b" not in line and line.endswith("[approxtrain][WARNING] - wandb: run done")
    assert to_console.format(record).endswith(coloured)

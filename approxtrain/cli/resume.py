"""``resume=<run dir>``: continue a run as it was configured, or refuse before touching it.

The run's config is composed again from its own overrides (``.hydra/overrides.yaml``)
with the command line's on top, and compared with the config it saved
(``.hydra/config.yaml``): a command line that changes what the checkpoint means --
anything but how long to train (``trainer.epochs``, ``trainer.max_steps``), where
(``trainer.device``) and the bookkeeping keys that cannot change what a run computes
(``logger.*``, ``trainer.num_workers``, ``trainer.log_every_n_steps``, ``dataset.root``, ...;
:func:`approxtrain.run.config_keys.is_bookkeeping_key`, which comparing runs reads too) -- is
refused, naming the keys.
Everything is read and checked before anything is written; the command line Hydra then
runs writes into the run dir and leaves its ``.hydra`` files as they are until the
checkpoint has been restored (:class:`RecordResume`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf

from approxtrain.run.callbacks import Callback
from approxtrain.run.checkpoint import load_checkpoint, verify_checkpoint
from approxtrain.run.config_keys import flatten, is_bookkeeping_key
from approxtrain.run.rundir import atomic_write, checkpoint_path
from approxtrain.run.schema import FINISHED, INTERRUPTED, RESULTS_FILE, RUNNING, read_results

if TYPE_CHECKING:
    from approxtrain.run.trainer import Trainer

RESUME_KEY = "resume"
# what a resume may change besides the bookkeeping keys: how long it trains and on what
ADJUSTABLE = ("trainer.epochs", "trainer.max_steps", "trainer.device")
ALLOWED_LINE = ("allowed to change on resume: trainer.epochs, trainer.max_steps, trainer.device and "
                "keys that only steer logging and I/O (logger.*, trainer.num_workers, trainer.log_every_n_steps, "
                "trainer.checkpoint, dataset.root, ...)")
UNSET = "<unset>"
HYDRA_DIR = ".hydra"


def parse_overrides(overrides: Sequence[str]) -> list[Override]:
    return OverridesParser.create().parse_overrides(list(overrides))


def last_value(overrides: Sequence[Override], key: str) -> Override | None:
    """The last override of ``key`` (the one that wins), else None."""
    return next((override for override in reversed(overrides) if override.key_or_group == key), None)


def resume_override(overrides: Sequence[Override]) -> Override | None:
    """The ``resume=<run dir>`` that wins among ``overrides``; None when there is none or it is null or empty."""
    resume = last_value(overrides, RESUME_KEY)
    return None if resume is None or resume.value() in (None, "") else resume


def _identity(override: Override) -> tuple[str, str | None]:
    return override.key_or_group, override.package


def merge_overrides(saved: Sequence[str], given: Sequence[Override]) -> list[str]:
    """The run's saved overrides, each replaced by the command line's override of the same key,
    then the command line's new ones (``resume=`` left out of both)."""
    given = [override for override in given if override.key_or_group != RESUME_KEY]
    by_identity = {_identity(override): override.input_line for override in given}
    merged = []
    for override in parse_overrides(saved):
        if override.key_or_group != RESUME_KEY:
            merged.append(by_identity.pop(_identity(override), override.input_line))
    return merged + list(by_identity.values())


def can_change_on_resume(key: str) -> bool:
    return key in ADJUSTABLE or is_bookkeeping_key(key)


def refused_changes(saved: dict[str, Any], resumed: dict[str, Any], current: dict[str, Any] | None = None) -> list[str]:
    """``key: old -> new`` for the keys of the run's config a resume may not change, one entry
    per top-level group (``sampler.name: 'nps' -> 'exact' (+2 more sampler.* keys)``). ``current``:
    the run's own overrides composed by this version; a key the run's saved config lacks (one a newer
    version added) counts as having this value, so only a command line that moves it is refused."""
    before, after = flatten(saved), flatten(resumed)
    before = {**{key: value for key, value in flatten(current or {}).items() if key not in before}, **before}
    changed = [key for key in sorted(before.keys() | after.keys())
               if before.get(key, UNSET) != after.get(key, UNSET) and not can_change_on_resume(key)]
    groups: dict[str, list[str]] = {}
    for key in changed:
        groups.setdefault(key.split(".")[0], []).append(key)
    lines = []
    for group, keys in groups.items():
        first = f"{group}.name" if f"{group}.name" in keys else keys[0]  # the group's option, when it changed
        more = f" (+{len(keys) - 1} more {group}.* keys)" if len(keys) > 1 else ""
        lines.append(f"{first}: {before.get(first, UNSET)!r} -> {after.get(first, UNSET)!r}{more}")
    return lines


def finished_line(run_dir: Path, cfg: DictConfig) -> str | None:
    """Why there is nothing left to train when the run finished and ``cfg`` asks for no more, else None."""
    results = read_results(run_dir)
    if results is None or results.get("status") != FINISHED:
        return None
    epochs, max_steps = cfg.trainer.epochs, cfg.trainer.max_steps
    history, steps = results.get("epochs") or [], results.get("steps", 0)
    if not (isinstance(history, list) and all(isinstance(e, dict) and type(e.get("epoch")) is int for e in history)
            and type(steps) is int):
        raise ValueError(f"{run_dir / RESULTS_FILE} is damaged (its epochs or steps are not what approxtrain writes)")
    done = history[-1]["epoch"] if history else 0
    if max_steps is not None and steps >= max_steps:
        return f"the run finished (step {steps} of trainer.max_steps={max_steps}); to train on, raise trainer.max_steps"
    if done >= epochs:
        return f"the run finished (epoch {done} of trainer.epochs={epochs}); to train on, raise trainer.epochs"
    return None


def load_record(path: Path) -> Any:
    """A run's ``.hydra`` YAML file; ``ValueError`` (one line naming it) when it does not parse."""
    try:
        return OmegaConf.load(path)
    except Exception as error:  # noqa: BLE001 - a damaged file: one line naming it
        raise ValueError(f"{path} is damaged ({(str(error).strip().splitlines() or [type(error).__name__])[0]})") from None


def check_run_dir(run_dir: Path) -> None:
    """A run dir that can be continued: ``ValueError`` (one line) when it is not one or its checkpoint is
    unreadable or damaged (:func:`~approxtrain.run.checkpoint.verify_checkpoint`)."""
    if not run_dir.is_dir():
        raise ValueError("no such run dir")
    for name in ("config.yaml", "overrides.yaml"):
        if not (run_dir / HYDRA_DIR / name).is_file():
            raise ValueError(f"not a run dir (no {HYDRA_DIR}/{name}); allowed: a dir an approxtrain run wrote")
    verify_checkpoint(checkpoint_path(run_dir))


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _composed(compose: Callable[[list[str]], DictConfig], own: Sequence[str], merged: list[str], resume: Override) -> DictConfig:
    """The config ``merged`` composes; ``ValueError`` (one line) when it does not: the command line's
    reason, or, when the run's own overrides no longer compose either, that."""
    try:
        return compose([*merged, resume.input_line])
    except Exception as error:  # noqa: BLE001 - told apart below, then one line
        try:
            compose([*merge_overrides(own, []), resume.input_line])
        except Exception:  # noqa: BLE001 - e.g. a group option the project no longer has
            raise ValueError(f"its config no longer composes: {_first_line(error)}") from None
        raise ValueError(_first_line(error)) from None


def _plain(cfg: DictConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    return container


def resume_overrides(resume: Override, given: Sequence[Override], compose: Callable[[list[str]], DictConfig]) -> list[str]:
    """The overrides that continue the run ``resume`` names with ``given`` (the command line's, hydra's
    left out) on top; ``compose(overrides)`` composes a config as the command line would -- once, and
    a second time (the run's own overrides alone) only for a run whose saved config lacks keys this
    version composes. ``ValueError`` with the reason in one line when the run cannot be continued so;
    reads only."""
    run_dir = Path(str(resume.value()))
    check_run_dir(run_dir)
    overrides_file = run_dir / HYDRA_DIR / "overrides.yaml"
    own = load_record(overrides_file)
    try:
        merged = merge_overrides(own, given)
    except Exception as error:  # noqa: BLE001 - not a list of overrides: one line naming the file
        raise ValueError(f"{overrides_file} is damaged ({_first_line(error)})") from None
    cfg = _composed(compose, own, merged, resume)
    resumed = _plain(cfg)
    saved = OmegaConf.to_container(load_record(run_dir / HYDRA_DIR / "config.yaml"), resolve=False)
    assert isinstance(saved, dict)
    current = None
    if flatten(resumed).keys() - flatten(saved).keys():  # written by an earlier version
        current = _plain(_composed(compose, own, merge_overrides(own, []), resume))
    refused = refused_changes(saved, resumed, current)
    if refused:
        raise ValueError(f"would change what the checkpoint means: {'; '.join(refused)}; {ALLOWED_LINE}")
    finished = finished_line(run_dir, cfg)
    if finished:
        raise ValueError(finished)
    return merged


class RecordResume(Callback):
    """Once the checkpoint is restored (``on_start``), the run's record says how it goes on: its
    ``.hydra/config.yaml`` and ``overrides.yaml`` become the ones it continues with (only keys a
    resume may change differ, e.g. ``trainer.epochs``), and ``write_config_tree()`` is called."""

    def __init__(self, cfg: DictConfig, overrides: Sequence[str], write_config_tree: Callable[[], None]) -> None:
        self.cfg, self.overrides, self.write_config_tree = cfg, list(overrides), write_config_tree

    def on_start(self, trainer: Trainer) -> None:
        hydra_dir = trainer.run_dir / HYDRA_DIR
        for name, node in (("config.yaml", self.cfg), ("overrides.yaml", OmegaConf.create(self.overrides))):
            text = OmegaConf.to_yaml(node)
            atomic_write(hydra_dir / name, lambda handle: handle.write(text.encode()))  # noqa: B023 - called before the next iteration
        self.write_config_tree()


def requeued_run(run_dir: Path, cfg: dict[str, Any]) -> bool:
    """Whether a sweep job finds, in its own dir, the run it is to continue: the same job started
    before and stopped (``interrupted`` by a signal with a checkpoint, or killed while ``running``)
    and was requeued -- submitit requeues a preempted job with the same command. The checkpoint's
    config must be this job's config (``resume`` aside)."""
    results = read_results(run_dir)
    path = checkpoint_path(run_dir)
    if results is None or results.get("status") not in (INTERRUPTED, RUNNING) or not path.is_file():
        return False
    saved = load_checkpoint(path)["config"]
    return {**saved, RESUME_KEY: None} == {**cfg, RESUME_KEY: None}

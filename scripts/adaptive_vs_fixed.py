"""Adaptive per-layer ratios against one fixed ratio at the same measured compute reduction.

For each model (MNIST MLP and CNN, PTB LSTM on the shared real data), each seed: train with
``schedule=adaptive`` at each budget, read the compute reduction the meter measured (mean over
the seeds), find the fixed ``ratio`` whose planned reduction is the same (bisection on the
plan, which for ``topk`` is what the meter counts), train with it, and print one markdown row
per (model, budget): measured reductions and the final metric (mean +- std over the seeds).
Every run's results go to ``--out/<model>/<config>/seed<seed>.json``; runs already there are
read instead of re-trained.

    nice -n 10 python scripts/adaptive_vs_fixed.py --data ../shared/data --out outputs/adaptive
    python scripts/adaptive_vs_fixed.py --models mlp --budgets 0.1 0.2 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import approxtrain.cli.config_store  # noqa: F401  (the config nodes made from code)
from approxtrain.config import layer_rules
from approxtrain.data import build_loaders
from approxtrain.models import build_model
from approxtrain.run.trainer import Trainer, example_input
from approxtrain.surgery import approximate_

# Each model sized to minutes of a shared 2-core CPU: its paper experiment, cut short (early training only).
MODELS = {
    "mlp": ("experiment=mlp_mnist", "trainer.epochs=1"),
    "cnn": ("experiment=cnn_mnist", "trainer.epochs=1", "trainer.max_steps=40"),
    "lstm": ("experiment=lstm_ptb", "model.hidden=200", "model.dropout=0.0", "trainer.epochs=1", "trainer.max_steps=20",
             "dataset.train_split=valid"),
}
COMMON = ("logger=none", "sampler=topk", "trainer.device=cpu", "trainer.num_workers=0", "trainer.checkpoint=false")


def run_config(model: str, data: Path, *overrides: str) -> dict[str, Any]:
    root = data / "PTB" if model == "lstm" else data
    with initialize_config_module("approxtrain.configs", version_base="1.3"):
        cfg = compose("train", [*COMMON, *MODELS[model], f"dataset.root={root}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def train(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """The run's results, trained now or read from ``path``."""
    if path.exists():
        return json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as run_dir:
        results = Trainer(cfg, Path(run_dir) / "run").fit().to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    return results


def planned_reduction(cfg: dict[str, Any], info: Any, ratio: float) -> float:
    cfg = {**cfg, "ratio": ratio}
    plan = approximate_(build_model(cfg["model"], info), layer_rules(cfg),
                        example_input=example_input(info, cfg["dataset"], "cpu"), batch_size=cfg["dataset"]["batch_size"])
    return plan.compute_reduction


def matching_ratio(cfg: dict[str, Any], reduction: float) -> float:
    """The fixed ratio whose planned compute reduction is ``reduction`` (to 3 decimals)."""
    info = build_loaders(cfg["dataset"], num_workers=0, seed=0, pin_memory=False).info
    low, high = 0.001, 1.0  # reduction falls as the ratio grows
    for _ in range(12):
        middle = (low + high) / 2
        low, high = (low, middle) if planned_reduction(cfg, info, middle) < reduction else (middle, high)
    return round((low + high) / 2, 3)


def summary(runs: list[dict[str, Any]]) -> tuple[str, str]:
    metrics = [run["final_metric"] for run in runs]
    reductions = [run["compute_reduction"] for run in runs]
    spread = statistics.stdev(metrics) if len(metrics) > 1 else 0.0
    scale = 100 if runs[0]["metric_name"] == "accuracy" else 1
    return f"{statistics.mean(reductions):.1%}", f"{statistics.mean(metrics) * scale:.2f} ± {spread * scale:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--every", type=int, default=10, help="adaptive: steps between decisions")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("outputs/adaptive"))
    args = parser.parse_args()
    print("| model | budget | adaptive: compute reduction | adaptive: metric | fixed ratio | fixed: compute reduction | fixed: metric |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for model in args.models:
        for budget in args.budgets:
            adaptive = [train(run_config(model, args.data, "schedule=adaptive", f"schedule.budget={budget}", "schedule.interval=step",
                                         f"schedule.every={args.every}", f"seed={seed}"),
                              args.out / model / f"adaptive{budget}" / f"seed{seed}.json") for seed in args.seeds]
            reduction = statistics.mean(run["compute_reduction"] for run in adaptive)
            ratio = matching_ratio(run_config(model, args.data), reduction)
            fixed = [train(run_config(model, args.data, f"ratio={ratio}", f"seed={seed}"),
                           args.out / model / f"ratio{ratio}" / f"seed{seed}.json") for seed in args.seeds]
            print(f"| {model} | {budget:g} | {' | '.join(summary(adaptive))} | {ratio:g} | {' | '.join(summary(fixed))} |", flush=True)


if __name__ == "__main__":
    main()

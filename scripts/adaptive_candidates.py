"""Adaptive per-layer budgets (MAC-weighted, variance) against the fixed ratio at the same measured compute.

Candidate (a) of RESULTS-adaptive.md's "Second try": every ``--every`` steps the sampled layers'
pair scores on that step's batch are collected (each layer's scores as shares of its own score
mass), and one global MAC budget -- what the sampled layers cost at the fixed ``ratio``, forward
and backward, as the compute meter counts it -- is allocated greedily: all (layer, pair) sorted
by score share per MAC of one pair of that layer (its forward and backward MACs), kept best
first while they fit in the budget (one that does not is skipped for the next). The layers'
``k`` take effect from the next step (until the first decision: the fixed ratio).

Candidate (c), ``variance``, a variance budget in the spirit of VCAS (Variance-Controlled Adaptive
Sampling, Liu et al., ICLR 2024): VCAS samples backprop and keeps the variance it adds a controlled
fraction of SGD's own; here the compute is what is fixed -- the same global MAC budget as (a) --
and the variance is what is traded. At the same decision points, each layer's ``k`` is chosen to
minimise the sum over the sampled layers of the *relative* variance sampling adds to that layer's
product: for pair scores ``s_i = |A^(i)| |B_(i)|``, Bernoulli CRS with the optimal probabilities
``p_i = min(1, c s_i)`` (``sum p_i = k``) has variance ``sum_i (1/p_i - 1) s_i^2``, taken relative
to ``(sum_i s_i)^2`` so that layers compare (:func:`relative_variance`, exact for every ``k`` by
sorting); the MACs go greedily to the largest variance reduction per MAC (marginal analysis, at
least one pair a layer, never over the budget: :func:`allocate_variance`). Training still uses
``sampler=topk`` with the chosen ``k`` per layer, as (a) and the fixed ratio do, so that the
comparison isolates the allocation; the Bernoulli variance only ranks where pairs are worth most.

For each seed it trains the fixed ratio (``topk``) and each chosen control (``--methods``;
default: fixed and macweighted) from the same config through the library API, writes
``--out/<method>/seed<seed>.json`` (runs already there are read, not re-trained) and prints the
measured compute reductions, ``test_metric_at_best`` (mean +- std) and the Welch 95 % interval of
each method minus fixed.

    nice -n 15 python scripts/adaptive_candidates.py --data <data dir> --out outputs/candidates \\
        --ratio 0.336 --seeds 0 1 2 3 4 --methods fixed variance -- experiment=mlp_mnist
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import approxtrain.cli.config_store  # noqa: F401  (the config nodes made from code)
from approxtrain.accounting import LayerShape, sampled_macs
from approxtrain.compare.stats import welch_interval
from approxtrain.config import validate
from approxtrain.run.callbacks import Callback, RatioControlCallback
from approxtrain.run.rundir import atomic_write
from approxtrain.run.trainer import Trainer
from approxtrain.schedule import RatioControl, layer_pairs, pair_scores

METHODS = ("fixed", "macweighted", "variance")


def call_shape(weight: Tensor, output: Tensor) -> LayerShape:
    """The MAC model of one call of a Linear (2-d weight) or Conv2d layer, from its weight and output."""
    if weight.dim() == 2:
        return LayerShape.linear(output.numel() // weight.shape[0], weight.shape[1], weight.shape[0])
    return LayerShape.conv2d(output.shape[0], weight.shape[1], weight.shape[0], weight.shape[2:], output.shape[2:])


def _spend(gains: list[Tensor], macs: list[int], budget: float) -> list[int]:
    """How many of each layer's items the greedy keeps: all items sorted by gain per MAC (``macs``:
    what one item of the layer costs), kept best first while they fit in ``budget`` (an item over
    what is left is skipped for the next)."""
    value = torch.cat([gain / cost for gain, cost in zip(gains, macs)])
    cost = torch.cat([torch.full_like(gain, float(mac)) for gain, mac in zip(gains, macs)])
    owner = torch.cat([torch.full(gain.shape, i) for i, gain in enumerate(gains)])
    kept, left = [], budget
    for index in torch.argsort(value, descending=True).tolist():  # best first; a pair over what is left is skipped
        if cost[index] <= left:
            kept.append(index)
            left -= cost[index].item()
    return torch.bincount(owner[torch.tensor(kept, dtype=torch.long)], minlength=len(gains)).tolist()


def allocate(scores: Mapping[str, Tensor], macs: Mapping[str, int], budget: float) -> dict[str, int]:
    """Each layer's ``k`` (at least 1): the pairs of best score share per MAC (``macs``: what one
    kept pair of the layer costs, forward and backward), kept while they fit in ``budget`` MACs."""
    names = list(scores)
    shares = [scores[name].double() / scores[name].double().sum().clamp_min(1e-300) for name in names]
    counts = _spend(shares, [macs[name] for name in names], budget)
    return {name: max(int(count), 1) for name, count in zip(names, counts)}


def relative_variance(scores: Tensor) -> Tensor:
    """``V[k - 1]`` for ``k = 1 .. n``: the variance of Bernoulli CRS with ``k`` pairs expected and
    the optimal probabilities, relative to the squared score mass.

    With pair scores ``s_i = |A^(i)| |B_(i)|``, keeping pair ``i`` with probability ``p_i`` and
    scaling it by ``1 / p_i`` is unbiased with ``E||est - AB||_F^2 = sum_i (1/p_i - 1) s_i^2``
    (Adelman & Silberstein 2018); the minimum under ``sum_i p_i = k, p_i <= 1`` is
    ``p_i = min(1, c s_i)``: the ``t`` largest scores kept surely, the rest ``p_i = c s_i`` with
    ``c = (k - t) / R_t``, so ``V = R_t^2 / (k - t) - Q_t`` (``R_t``, ``Q_t``: sum of the scores,
    of their squares, outside the ``t`` largest). ``t`` is the first with
    ``t + R_t / s_(t+1) >= k`` (nondecreasing in ``t``, so a search). Divided by ``(sum_i s_i)^2``,
    the bound on ``||AB||_F^2``'s scale, so that layers compare; all zeros: 0. Convex and
    nonincreasing in ``k``, 0 at ``k = n``."""
    s = torch.sort(scores.double().clamp_min(0), descending=True).values
    n, total = s.numel(), s.sum()
    if total <= 0:
        return torch.zeros(n, dtype=torch.float64)
    rest = torch.flip(torch.cumsum(torch.flip(s, [0]), 0), [0])  # R_t: sum of s[t:]
    rest_sq = torch.flip(torch.cumsum(torch.flip(s * s, [0]), 0), [0])  # Q_t
    positions = torch.arange(n, dtype=torch.float64)
    reach = torch.where(s > 0, positions + rest / s.clamp_min(1e-300), torch.full_like(s, float("inf")))
    k = positions + 1
    t = torch.searchsorted(reach, k).clamp_max(n - 1)  # the first t with reach[t] >= k (reach[k - 1] >= k)
    variance = rest[t] ** 2 / (k - t) - rest_sq[t]
    return (variance / total**2).clamp_min(0)


def allocate_variance(scores: Mapping[str, Tensor], macs: Mapping[str, int], budget: float) -> dict[str, int]:
    """Each layer's ``k`` minimising ``sum`` over layers of :func:`relative_variance` at that ``k``
    within ``budget`` MACs (``macs``: what one kept pair of the layer costs, forward and backward).

    Every layer first gets 1 pair (charged to the budget); then marginal analysis: each further
    pair of a layer, in order, is worth its variance reduction ``V(k) - V(k + 1)`` per MAC, and all
    are kept best first while they fit (one that does not is skipped for the next), so the budget is
    never exceeded unless one pair a layer already does. ``V`` is convex, so a layer's gains fall
    with ``k`` and the kept ones are a prefix: the greedy is the continuous problem's optimum up to
    the last pair."""
    names = list(scores)
    costs = [macs[name] for name in names]
    gains = [-torch.diff(relative_variance(scores[name])) for name in names]
    counts = _spend(gains, costs, budget - sum(costs))
    return {name: 1 + int(count) for name, count in zip(names, counts)}


Allocator = Callable[[Mapping[str, Tensor], Mapping[str, int], float], dict[str, int]]
ALLOCATORS: dict[str, Allocator] = {"macweighted": allocate, "variance": allocate_variance}


class BudgetRatios(RatioControl):
    """Every ``every`` steps, the layers' ``k`` by ``allocator`` (default :func:`allocate`) on that
    step's scores, within what the sampled layers cost at the fixed ratio."""

    def __init__(self, model: nn.Module, *, ratio: float, every: int = 10, allocator: Allocator = allocate) -> None:
        super().__init__(model)
        self.target, self.every, self.allocator = ratio, every, allocator
        self.scores: dict[str, Tensor] = {}
        self.macs: dict[str, int] = {}  # what one kept pair costs, by layer
        self.budget: dict[str, int] = {}  # what the layer costs at the fixed ratio
        self.handles: list = []
        self.called: set[str] = set()  # the layers called so far in the collecting step

    def before_step(self, epoch: int, batch: int, step: int) -> None:
        if self.handles:  # the previous step collected every layer's scores: decide
            for handle in self.handles:
                handle.remove()
            self.handles = []
            for name, k in self.allocator(self.scores, self.macs, sum(self.budget.values())).items():
                self.layers[name].sampling = replace(self.base[name], fixed_k=k)
        if step % self.every == 0:
            self.called = set()
            self.handles = [module.register_forward_hook(self._collector(name)) for name, module in self.layers.items()]

    def _collector(self, name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
        def collect(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not module.training:
                return
            scores = pair_scores(module, args[0])
            shape, config = call_shape(module.product_weight(), output), self.base[name]
            first = not args[0].requires_grad  # a first layer has no input gradient
            macs = sampled_macs(shape, config, 1, input_grad=not first)[1].total
            budget = sampled_macs(shape, config, input_grad=not first)[1].total
            if name in self.called:  # called again in the step (an unrolled LSTM's gates): all its rows together
                scores = (self.scores[name] ** 2 + scores**2).sqrt()  # |A^(i)| over the calls' rows; B is shared
                macs, budget = self.macs[name] + macs, self.budget[name] + budget
            self.called.add(name)
            self.scores[name], self.macs[name], self.budget[name] = scores, macs, budget
        return collect

    @property
    def ratio(self) -> float:
        """The share of pairs the sampled layers keep: ``sum k / sum n``."""
        n = sum(layer_pairs(module) for module in self.layers.values())
        return sum(self.layer_k().values()) / n if n else 1.0


class BudgetCallback(Callback):
    """Builds :class:`BudgetRatios` (with ``allocator``) on the trainer's model at the start and drives it."""

    all_ranks = True

    def __init__(self, ratio: float, every: int, allocator: Allocator = allocate) -> None:
        self.ratio, self.every, self.allocator, self.driver = ratio, every, allocator, None

    def on_start(self, trainer: Trainer) -> None:
        control = BudgetRatios(trainer.model, ratio=self.ratio, every=self.every, allocator=self.allocator)
        self.driver = RatioControlCallback(control)

    def on_train_batch_start(self, trainer: Trainer, batch: Any) -> None:
        self.driver.on_train_batch_start(trainer, batch)

    def on_train_batch_end(self, trainer: Trainer, epoch: int, batch: int) -> None:
        self.driver.on_train_batch_end(trainer, epoch, batch)

    def on_train_epoch_end(self, trainer: Trainer, record: Any) -> None:
        self.driver.on_train_epoch_end(trainer, record)


def train(method: str, overrides: list[str], ratio: float, every: int, run_dir: Path) -> dict[str, Any]:
    """One run; its results.json fields that the comparison reads, and the last epoch's ``layer_k``."""
    with initialize_config_module("approxtrain.configs", version_base="1.3"):
        cfg = compose("train", [*overrides, "sampler=topk", f"ratio={ratio}", "logger=none",
                                "trainer.num_workers=0", "trainer.checkpoint=false"])
    spec = validate(OmegaConf.to_container(cfg, resolve=True))
    callbacks = [BudgetCallback(ratio, every, ALLOCATORS[method])] if method in ALLOCATORS else []
    Trainer(spec, str(run_dir), callbacks).fit()
    results = json.loads((run_dir / "results.json").read_text())
    return {key: results.get(key) for key in ("compute_reduction", "test_metric_at_best", "status")} | {
        "layer_k": (results.get("epochs") or [{}])[-1].get("layer_k")}


def run_or_read(method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    path = args.out / method / f"seed{seed}.json"
    if not path.exists():
        overrides = [*args.overrides, f"seed={seed}"]
        if args.data:
            overrides += [f"dataset.root={args.data}", "dataset.download=false"]
        row = train(method, overrides, args.ratio, args.every, args.out / method / f"seed{seed}")
        atomic_write(path, lambda handle: handle.write(json.dumps(row, indent=1).encode()))  # killed: no half row
    return json.loads(path.read_text())


def summary(rows: Mapping[str, list[dict[str, Any]]]) -> str:
    """Markdown: per method (``rows``' keys, ``fixed`` first) the mean measured reduction and
    metric; each other method minus fixed with the Welch 95 % interval."""
    lines = ["| method | compute reduction | test_metric_at_best | n |", "|---|---|---|---|"]
    metric = {method: [row["test_metric_at_best"] for row in rows[method]] for method in rows}
    for method in rows:
        reduction = statistics.fmean(row["compute_reduction"] for row in rows[method])
        spread = statistics.stdev(metric[method]) if len(metric[method]) > 1 else 0.0
        lines.append(f"| {method} | {reduction:.2%} | {statistics.fmean(metric[method]):.4f} ± {spread:.4f} | {len(metric[method])} |")
    for method in (method for method in rows if method != "fixed" and len(metric["fixed"]) > 1):
        interval = welch_interval(metric[method], metric["fixed"])
        delta = statistics.fmean(metric[method]) - statistics.fmean(metric["fixed"])
        lines.append(f"\n{method} - fixed: {delta:+.4f} [{interval.low:+.4f}, {interval.high:+.4f}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where each run and its row go")
    parser.add_argument("--data", default=None, help="dataset.root (no download); default: the config's")
    parser.add_argument("--ratio", type=float, default=0.336, help="the fixed ratio; the MAC budget is this share")
    parser.add_argument("--every", type=int, default=10, help="steps between MAC-weighted decisions")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["fixed", "macweighted"],
                        help="which to run (fixed always: the others are compared with it)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. experiment=mlp_mnist trainer.epochs=10")
    args = parser.parse_args(argv)
    methods = ["fixed", *(method for method in args.methods if method != "fixed")]
    for method in methods:
        (args.out / method).mkdir(parents=True, exist_ok=True)
    rows = {method: [run_or_read(method, seed, args) for seed in args.seeds] for method in methods}
    print(summary(rows))
    print("layer_k at the end (first seed):", {method: rows[method][0]["layer_k"] for method in methods})


if __name__ == "__main__":
    main()

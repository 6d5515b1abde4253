"""Accuracy and CPU speed of ``sampler.reselect_every=N`` against N=1 (select every step).

The paper's MLP (784-500-500-10, every layer sampled, topk by default) on the MNIST subset
(5k train / 10k test, read from ``--data`` in torchvision's raw layout), Adam 1e-3, batch 50,
the same seeds for every N: each seed's data order, initial weights and schedule are shared, so
the per-seed difference in test accuracy is the effect of reusing the selection. Then the step time of each N, interleaved
round by round in one process. Prints a table (mean, standard deviation, per-seed differences
against N=1, median step time, speedup) and writes ``--json``.

    python scripts/reselect_accuracy.py --data ../shared/data --every 1 4 16 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from approxtrain import LayerRule, SamplingConfig, approximate_
from approxtrain.data import DatasetInfo
from approxtrain.models import build_model

MNIST = DatasetInfo("mnist", "image", 1, (28, 28), 10)


def load(root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import MNIST
    data = MNIST(root=root, train=train, download=False)
    x = (data.data.float() / 255.0 - 0.1307) / 0.3081
    return x.unsqueeze(1), data.targets


def run(every: int, seed: int, args: argparse.Namespace, data: tuple) -> dict:
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(seed)
    model = build_model({"name": "mlp", "hidden": 500}, MNIST)
    approximate_(model, [LayerRule(sampling=SamplingConfig(args.policy, ratio=args.ratio, reselect_every=every))])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(x_train), generator=order).split(args.batch):
            start = time.perf_counter()
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps.append(time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return {"every": every, "seed": seed, "accuracy": accuracy, "median_step_ms": statistics.median(steps) * 1e3}


def step_times(args: argparse.Namespace, data: tuple, rounds: int = 60) -> dict[int, float]:
    """Median ms of one training step per N, interleaved round by round on one batch after N
    steps of warm-up (so every N is in its steady state: N-1 of N steps reuse), same machine load."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_ops import time_interleaved

    (x_train, y_train), _ = data
    x, y = x_train[: args.batch], y_train[: args.batch]
    steps = {}
    for every in args.every:
        torch.manual_seed(0)
        model = build_model({"name": "mlp", "hidden": 500}, MNIST)
        approximate_(model, [LayerRule(sampling=SamplingConfig(args.policy, ratio=args.ratio, reselect_every=every))])
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model=model, optimizer=optimizer) -> None:
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps[every] = step
    times = time_interleaved(steps, torch.device("cpu"), max(args.every), rounds)
    return {every: statistics.median(t) for every, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--every", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--policy", default="topk")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load(args.data, True), load(args.data, False)
    rows = []
    for seed in args.seeds:  # seeds outermost: every N of a seed runs under the same machine load
        for every in args.every:
            rows.append(run(every, seed, args, data))
            print(json.dumps(rows[-1]), flush=True)
    speed = step_times(args, data)
    base = {r["seed"]: r["accuracy"] for r in rows if r["every"] == args.every[0]}
    print(f"\nMLP 784-500-500-10, MNIST 5k/10k, {args.policy} ratio {args.ratio}, {args.epochs} epochs, batch {args.batch}, "
          f"seeds {args.seeds}; difference against reselect_every={args.every[0]} per seed")
    print(f"{'every':>5}  {'accuracy mean':>13}  {'sd':>6}  {'diff mean':>9}  {'diff range':>17}  {'step ms':>7}  "
          f"{'speedup':>7}")
    for every in args.every:
        mine = [r for r in rows if r["every"] == every]
        acc = [r["accuracy"] * 100 for r in mine]
        diff = [(r["accuracy"] - base[r["seed"]]) * 100 for r in mine]
        print(f"{every:>5}  {statistics.mean(acc):>12.2f}%  {statistics.stdev(acc) if len(acc) > 1 else 0:>6.2f}  "
              f"{statistics.mean(diff):>+9.2f}  {min(diff):>+8.2f}..{max(diff):>+6.2f}  {speed[every]:>7.2f}  "
              f"{speed[args.every[0]] / speed[every]:>6.3f}x")
    print("step ms: median of one training step, the N interleaved round by round on one batch (60 rounds)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": rows, "step_ms": speed}, f, indent=1)


if __name__ == "__main__":
    main()

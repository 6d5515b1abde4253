"""Host cost of one sampled layer: what a training step pays per layer before any arithmetic.

On a GPU the host launches every kernel; where it cannot launch them as fast as the device
runs them (the H200's WRN-28-10 topk step: 23 ms of wall time for ~16 ms of GPU time) each
microsecond of host work per layer is a microsecond of step time. This script measures that
work: one layer, as the trainer runs it (made approximate by the surgery, its MAC meter
attached), forward + backward on operands small enough that the device's work is negligible,
so the wall time per call is the host's (Python, dispatcher, allocator, launches).

For each layer (a linear 64->64 on 8 rows; a 3x3 conv 16->16 on 2x8x8, channels_last) and
each variant -- the untouched layer (``exact``), the approximate layer at ratio 1.0, top-k
and nps at ratio 0.5, top-k reusing its selection for 4 steps -- under each kernel backend:

* the median over ``--repeats`` rounds (interleaved: every variant once per round) of the
  wall time per call, ``--calls`` calls a round (on CUDA synchronised at each round's ends);
* ``extra us``: that median minus the exact layer's;
* ``ops``: the operators one call dispatches (views excluded), averaged over 4 calls (the reuse
  cycle of the last variant): on a GPU each is a launch or more (a custom op's counted as one).

    python scripts/bench_host.py [--device auto] [--kernels torch triton] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

try:
    import approxtrain  # noqa: F401 - only whether it imports
except ModuleNotFoundError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from approxtrain import kernels
from approxtrain.accounting import ComputeMeter
from approxtrain.profiling import device_name
from approxtrain.sampling import SamplingConfig
from approxtrain.surgery import LayerRule, approximate_, attach_meter

VARIANTS = {  # name: the layer's sampling (None: the untouched layer)
    "exact": None,
    "ratio 1.0": SamplingConfig("topk", ratio=1.0),
    "topk 0.5": SamplingConfig("topk", ratio=0.5),
    "nps 0.5": SamplingConfig("nps", ratio=0.5),
    "topk 0.5 reselect 4": SamplingConfig("topk", ratio=0.5, reselect_every=4),
}
OPS_CALLS = 4  # calls the operators are counted over
# Operators that only make views: no kernel
_VIEWS = frozenset({"view", "_unsafe_view", "t", "transpose", "permute", "expand", "as_strided", "unsqueeze", "squeeze",
                    "detach", "alias", "slice", "select", "_reshape_alias", "split", "unbind"})


class OperatorCount(TorchDispatchMode):
    """Counts the operators dispatched inside it, views excluded."""

    def __init__(self) -> None:
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in _VIEWS:
            self.count[f"{func.namespace}::{func.overloadpacket.__name__}"] += 1
        return func(*args, **(kwargs or {}))


def make_layer(kind: str, sampling: SamplingConfig | None, device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The layer as the trainer runs it, an input (requiring a gradient, as a hidden layer's does) and an output gradient."""
    torch.manual_seed(0)
    if kind == "linear":
        model, x = nn.Sequential(nn.Linear(64, 64)), torch.randn(8, 64)
    else:
        model, x = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1)), torch.randn(2, 16, 8, 8)
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    model, x = model.to(device), x.to(device).requires_grad_()
    if sampling is not None:
        approximate_(model, [LayerRule(sampling=sampling)], generator=torch.Generator(device=device).manual_seed(0))
    attach_meter(model, ComputeMeter())
    model.train()
    grad = torch.ones_like(model(x))
    return model, x, grad


def calls(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, count: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(count):
            x.grad = None
            model.zero_grad(set_to_none=True)
            model(x).backward(grad)
    return run


def measure(kind: str, backends: list[str], device: torch.device, count: int, warmup: int, repeats: int) -> list[dict]:
    """Rows of one layer kind: every (variant, backend), their rounds interleaved."""
    cases = []
    for backend in backends:
        for name, sampling in VARIANTS.items():
            if name == "exact" and backend != backends[0]:
                continue  # the untouched layer runs no kernel of ours
            kernels.set_backend(backend)
            model, x, grad = make_layer(kind, sampling, device)
            cases.append({"layer": kind, "variant": name, "kernels": backend, "run": calls(model, x, grad, count),
                          "counted": calls(model, x, grad, OPS_CALLS), "us": []})
    for case in cases:
        kernels.set_backend(case["kernels"])
        case["run"]() if warmup else None
        with OperatorCount() as counted:
            case["counted"]()
        case["ops"] = sum(counted.count.values()) / OPS_CALLS
        case["op_counts"] = {name: n / OPS_CALLS for name, n in counted.count.items()}
    for _ in range(repeats):
        for case in cases:
            kernels.set_backend(case["kernels"])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            case["run"]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            case["us"].append((time.perf_counter() - start) / count * 1e6)
    exact = statistics.median(next(c for c in cases if c["variant"] == "exact")["us"])
    rows = []
    for case in cases:
        median = statistics.median(case["us"])
        quartiles = statistics.quantiles(case["us"], n=4) if len(case["us"]) > 1 else [median] * 3
        rows.append({"layer": kind, "variant": case["variant"], "kernels": case["kernels"], "us_per_call": median,
                     "iqr_us": quartiles[2] - quartiles[0], "extra_us": median - exact, "ops": case["ops"],
                     "op_counts": case["op_counts"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--kernels", nargs="+", default=None,
                        help="kernel backends: torch, triton, triton:<pieces> (default: torch, and triton on CUDA)")
    parser.add_argument("--calls", type=int, default=200, help="calls per timed round (default 200)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=1, choices=[0, 1], help="one untimed round first (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the host's launching thread)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    for name in args.kernels or []:  # torch, triton or triton:<pieces>
        try:
            kernels.parse_backend(name, "--kernels")
        except ValueError as error:
            parser.error(str(error))
    if args.calls < 1 or args.repeats < 1:
        parser.error(f"--calls={args.calls}, --repeats={args.repeats}; allowed: both >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda but CUDA is not available; allowed here: cpu, auto")
    device = torch.device("cuda" if args.device == "cuda" or args.device == "auto" and torch.cuda.is_available() else "cpu")
    backends = args.kernels or (["torch", "triton"] if device.type == "cuda" else ["torch"])
    if any(kernels.parse_backend(name) for name in backends) and device.type != "cuda" and not kernels.interpreting():
        parser.error("--kernels triton runs the Triton kernels on CUDA only (or under TRITON_INTERPRET=1); allowed here: torch")
    torch.set_num_threads(args.threads)
    meta = {"device": device.type, "device_name": device_name(device), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "calls": args.calls,
            "repeats": args.repeats, "date": datetime.date.today().isoformat(),
            "command": " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))}
    print(f"device {meta['device_name']} ({device.type}), torch {meta['torch']}, {meta['threads']} thread(s), "
          f"{args.calls} calls x {args.repeats} rounds")
    rows = measure("linear", backends, device, args.calls, args.warmup, args.repeats)
    rows += measure("conv2d", backends, device, args.calls, args.warmup, args.repeats)
    print(f"{'layer':<8}{'variant':<22}{'kernels':<9}{'us/call':>9}{'(IQR)':>8}{'extra us':>10}{'ops':>6}")
    for row in rows:
        print(f"{row['layer']:<8}{row['variant']:<22}{row['kernels']:<9}{row['us_per_call']:>9.1f}{row['iqr_us']:>8.1f}"
              f"{row['extra_us']:>10.1f}{row['ops']:>6.1f}")
    print("us/call: forward + backward of one layer on tiny operands (the host's time); extra: over the untouched layer;")
    print(f"ops: operators dispatched per call (mean of {OPS_CALLS}), views excluded")
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

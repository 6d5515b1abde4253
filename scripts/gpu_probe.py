"""The ceiling probe: how fast a channel/feature-sampled op can be on this device, and how close
the approximate op gets, per shape, in one process.

For each shape, in interleaved rounds (one call of each in turn, synchronised around each):
* ``exact``: the exact op's forward+backward (``F.linear`` / ``F.conv2d``, input and weight require grad);
* ``ceiling``: the same op, dense, with only ``k`` input features/channels -- what sampling at
  ``ratio`` can at best run (the issue's bound, measured rather than assumed);
* ``approx_<backend>``: ``approx_linear`` / ``approx_conv2d`` with ``topk`` at ``ratio``, under each
  kernel backend (``torch``; ``triton`` where it runs);
* ``ratio1``: the approximate op at ratio 1.0 (the exact path: its overhead).
Then each sampling piece alone, per backend: the pair norms (scores), the top-k, the gather of the
input's kept slices, the weight's, and the spreading of the sampled input gradient to full size.

Reports, per shape: times (median ms), ``of_ceiling = ceiling / approx`` (goal >= 0.85) and
``pieces_share = sum of the best backend's pieces / exact`` (goal <= 0.10); writes ``--json``.

    python scripts/gpu_probe.py --json probe.json                # CUDA, bf16, the issue's shapes
    python scripts/gpu_probe.py --smoke --json /tmp/probe.json   # any device, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import synchronize, time_call, time_interleaved

from approxtrain import SamplingConfig, approx_conv2d, approx_linear, kernels
from approxtrain._layout import norms, spread, take
from approxtrain.modules import _store_column_major_
from approxtrain.sampling import Selection, select

GOAL_OF_CEILING = 0.85
GOAL_PIECES_SHARE = 0.10
# (batch, in, out) of each linear; (batch, channels, out channels, size) of each 3x3 conv (padding 1)
LINEARS = {"linear_8192x4096": (8192, 4096, 4096), "linear_512x4096": (512, 4096, 4096)}
CONVS = {"conv_256x256@32": (256, 256, 256, 32), "wrn_160@32": (128, 160, 160, 32), "wrn_320@16": (128, 320, 320, 16),
         "wrn_640@8": (128, 640, 640, 8), "resnet50_64@56": (256, 64, 64, 56), "resnet50_128@28": (256, 128, 128, 28),
         "resnet50_256@14": (256, 256, 256, 14), "resnet50_512@7": (256, 512, 512, 7)}
SMOKE_LINEARS = {"linear_64x48": (64, 48, 32)}
SMOKE_CONVS = {"conv_16@6": (2, 16, 8, 6)}


def backends(device: torch.device) -> list[str]:
    """The kernel backends that run here: triton on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    found = ["torch"]
    try:
        kernels.set_backend("triton")
        if kernels.enabled(torch.empty(0, device=device), "scores"):
            found.append("triton")
    except ValueError:
        pass
    kernels.set_backend("torch")
    return found


def with_backend(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        kernels.set_backend(name)
        return fn()
    return run


def fwd_bwd(forward: Callable[[], torch.Tensor], grad: torch.Tensor, leaves: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for t in leaves:
            t.grad = None
        forward().backward(grad)
    return run


def leaf(*shape, device, dtype, memory_format=torch.contiguous_format) -> torch.Tensor:
    return torch.randn(*shape, device=device).to(dtype).contiguous(memory_format=memory_format).requires_grad_()


def linear_ops(m: int, n: int, out: int, k: int, ratio: float, device, dtype) -> tuple[dict, dict, torch.Tensor]:
    x, w = leaf(m, n, device=device, dtype=dtype), leaf(out, n, device=device, dtype=dtype)
    w_col = w.detach().clone().requires_grad_()
    _store_column_major_(w_col)  # as ApproxLinear keeps it
    xs, ws = leaf(m, k, device=device, dtype=dtype), leaf(out, k, device=device, dtype=dtype)
    g = torch.randn(m, out, device=device, dtype=dtype)
    config, exact1 = SamplingConfig("topk", ratio=ratio), SamplingConfig("topk", ratio=1.0)
    steps = {"exact": fwd_bwd(lambda: F.linear(x, w), g, [x, w]),
             "ceiling": fwd_bwd(lambda: F.linear(xs, ws), g, [xs, ws]),
             "ratio1": fwd_bwd(lambda: approx_linear(x, w_col, None, exact1), g, [x, w_col]),
             "approx": fwd_bwd(lambda: approx_linear(x, w_col, None, config), g, [x, w_col])}
    xd, wd = x.detach(), w_col.detach()
    return steps, pieces(xd, wd, k, g_k=torch.randn(m, k, device=device, dtype=dtype)), x


def conv_ops(batch: int, c: int, out: int, size: int, k: int, ratio: float, device, dtype) -> tuple[dict, dict, torch.Tensor]:
    cl = torch.channels_last
    on = {"device": device, "dtype": dtype, "memory_format": cl}
    x, w = leaf(batch, c, size, size, **on), leaf(out, c, 3, 3, **on)
    xs, ws = leaf(batch, k, size, size, **on), leaf(out, k, 3, 3, **on)
    g = torch.randn(batch, out, size, size, device=device, dtype=dtype).contiguous(memory_format=cl)
    config, exact1 = SamplingConfig("topk", ratio=ratio), SamplingConfig("topk", ratio=1.0)
    steps = {"exact": fwd_bwd(lambda: F.conv2d(x, w, padding=1), g, [x, w]),
             "ceiling": fwd_bwd(lambda: F.conv2d(xs, ws, padding=1), g, [xs, ws]),
             "ratio1": fwd_bwd(lambda: approx_conv2d(x, w, None, 1, 1, 1, exact1), g, [x, w]),
             "approx": fwd_bwd(lambda: approx_conv2d(x, w, None, 1, 1, 1, config), g, [x, w])}
    g_k = torch.randn(batch, k, size, size, device=device, dtype=dtype).contiguous(memory_format=cl)
    return steps, pieces(x.detach(), w.detach(), k, g_k), x


def pieces(x: torch.Tensor, w: torch.Tensor, k: int, g_k: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Each sampling piece of one forward+backward, alone (the weight-gradient spread is the
    conv's; the linear's is written by its product)."""
    n = w.shape[1]
    scores = norms(x, 1) * norms(w, 1)
    keep = torch.topk(scores, k).indices.sort().values
    selection = Selection(keep, None, True)
    config = SamplingConfig("topk", ratio=k / n)
    out = {"scores": lambda: norms(x, 1) * norms(w, 1),
           "topk": lambda: select(scores, k, config, None),
           "gather_input": lambda: take(x, 1, keep),
           "gather_weight": lambda: w.index_select(1, keep) if w.dim() == 4 else take(w, 1, keep),
           "spread_input_grad": lambda: spread(g_k, 1, n, selection, channels_last=g_k.dim() == 4)}
    if w.dim() == 4:
        g_w = w.index_select(1, keep)
        out["spread_weight_grad"] = lambda: spread(g_w, 1, n, selection)
    return out


def probe(name: str, built: tuple[dict, dict, torch.Tensor], found: list[str], device, warmup: int, repeats: int) -> dict:
    steps, parts, _ = built
    timed = {"exact": steps["exact"], "ceiling": steps["ceiling"], "ratio1": steps["ratio1"]}
    timed.update({f"approx_{b}": with_backend(b, steps["approx"]) for b in found})
    rounds = time_interleaved(timed, device, warmup, repeats)
    kernels.set_backend("torch")
    ms = {key: statistics.median(values) for key, values in rounds.items()}
    piece_ms = {b: {p: with_backend(b, fn) for p, fn in parts.items()} for b in found}
    piece_ms = {b: {p: time_call(fn, device, warmup, repeats)["median"] for p, fn in fns.items()} for b, fns in piece_ms.items()}
    kernels.set_backend("torch")
    best = {p: min(piece_ms[b][p] for b in found) for p in parts}
    approx_best = min(ms[f"approx_{b}"] for b in found)
    row = {"shape": name, "ms": ms, "pieces_ms": piece_ms, "ceiling_speedup": ms["exact"] / ms["ceiling"],
           "speedup": ms["exact"] / approx_best, "of_ceiling": {b: ms["ceiling"] / ms[f"approx_{b}"] for b in found},
           "pieces_share": sum(best.values()) / ms["exact"], "ratio1_overhead": ms["ratio1"] / ms["exact"] - 1}
    row["goals"] = {"of_ceiling": max(row["of_ceiling"].values()) >= GOAL_OF_CEILING,
                    "pieces_share": row["pieces_share"] <= GOAL_PIECES_SHARE, "ratio1_overhead": row["ratio1_overhead"] <= 0.02}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 warm-up, 2 rounds (any device)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--shapes", nargs="+", default=None, help="only these shapes (names as printed)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 10)
    repeats = args.repeats if args.repeats is not None else (2 if args.smoke else 30)
    torch.backends.cudnn.benchmark = True
    linears, convs = (SMOKE_LINEARS, SMOKE_CONVS) if args.smoke else (LINEARS, CONVS)
    found = backends(device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, {dtype}, "
          f"topk ratio {args.ratio}, backends {found}, warmup {warmup}, rounds {repeats}", flush=True)
    rows = []
    cases = [(name, "linear", shape) for name, shape in linears.items()] + [(name, "conv", shape) for name, shape in convs.items()]
    for name, kind, shape in cases:
        if args.shapes and name not in args.shapes:
            continue
        n = shape[1]
        k = max(1, round(n * args.ratio))
        built = linear_ops(*shape, k, args.ratio, device, dtype) if kind == "linear" else conv_ops(*shape, k, args.ratio, device, dtype)
        row = probe(name, built, found, device, warmup, repeats)
        rows.append(row)
        del built
        synchronize(device)
        ms = row["ms"]
        approx = "  ".join(f"approx[{b}] {ms[f'approx_{b}']:.3f} ms ({row['of_ceiling'][b]:.2f} of ceiling)" for b in found)
        print(f"{name:<18} exact {ms['exact']:.3f}  ceiling {ms['ceiling']:.3f} ({row['ceiling_speedup']:.2f}x)  {approx}  "
              f"pieces {row['pieces_share']:.1%} of exact  ratio1 {row['ratio1_overhead']:+.1%}", flush=True)
        for b in found:
            print(f"{'':<18} pieces[{b}] " + "  ".join(f"{p} {t:.3f}" for p, t in row["pieces_ms"][b].items()), flush=True)
        if args.json:  # after every shape: a run cut short keeps what it measured
            args.json.write_text(json.dumps({"device": str(device), "dtype": str(dtype), "ratio": args.ratio, "backends": found,
                                             "warmup": warmup, "repeats": repeats, "goal_of_ceiling": GOAL_OF_CEILING,
                                             "goal_pieces_share": GOAL_PIECES_SHARE, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

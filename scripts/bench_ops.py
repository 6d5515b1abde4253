"""Op-level benchmark: forward+backward time of exact vs column-row sampled linear / conv2d.

For each op and sampling ratio it measures, in one run with exact and approximate
steps interleaved round by round:

* median and IQR of one forward+backward step (``--warmup`` steps first, then
  ``--repeats`` timed rounds; ``torch.cuda.synchronize()`` around each on CUDA);
* speedup = exact median / approximate median, the FLOP bound ``n / k`` and the
  fraction of it reached; at ratio 1.0 the overhead (the op takes the exact path);
* where the approximate step's extra time goes, from the op's own profiler ranges
  over real steps: selection (pair norms + sampler), the gathers of the sampled input
  and weight slices, and the spreading of the sampled gradients into full-size ones
  ("scatter"), each as a share of the exact step;
* CPU allocator: like the CLI, the script tells glibc to keep freed memory
  (``approxtrain.cli.allocator``); ``APPROXTRAIN_MALLOC=system`` measures with the
  system's default allocator behaviour instead.
* memory: bytes saved for backward (``torch.autograd.graph.saved_tensors_hooks``),
  all and without the weight parameter itself (which exists anyway); on CUDA also the
  peak allocation of one step above what was allocated before it.

The exact baseline is ``F.linear`` / ``F.conv2d`` with autograd; no bias on either side. The
exact linear multiplies ``nn.Linear``'s row-major weight, the approximate one the same values
stored column-major, as ``ApproxLinear`` keeps them (``--linear-weight row``: the same tensor).

    python scripts/bench_ops.py [--device auto] [--dtype fp32] [--ratios 1.0,0.5,0.25] [--json PATH]
    python scripts/bench_ops.py --device cuda --dtype bf16 --channels-last --linear 512,4096,4096 8192,4096,4096
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import approxtrain  # noqa: F401 - only whether it imports
except ModuleNotFoundError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from approxtrain.cli.allocator import retain_freed_memory
from approxtrain.functional import approx_conv2d, approx_linear
from approxtrain.policies import get_policy
from approxtrain.profiling import GATHER_RANGE, SCATTER_RANGE, SELECT_RANGE, device_name, range_seconds
from approxtrain.sampling import POLICIES, SamplingConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET_SPEEDUP_AT_HALF = 1.7
TARGET_OVERHEAD_AT_ONE = 0.02
TARGET_SELECTION_SHARE = 0.10


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quartiles(times: list[float]) -> dict[str, float]:
    t = torch.tensor(times, dtype=torch.float64)
    q1, median, q3 = (torch.quantile(t, q).item() for q in (0.25, 0.5, 0.75))
    return {"median": median, "q1": q1, "q3": q3, "iqr": q3 - q1, "min": t.min().item()}


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Quartiles (ms) of ``fn()`` wall time, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return quartiles(times)


def time_interleaved(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Per-round wall times (ms) of each step; every round runs every step once, in turn."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


# ----------------------------------------------------------------------------- ops


@dataclass
class OpCase:
    """One benchmarked op: its tensors and how to run / dissect it."""

    name: str
    label: str  # the op and its shape, e.g. "linear 512x4096->4096"
    shape: dict[str, int]
    input: torch.Tensor
    weight: torch.Tensor
    grad_output: torch.Tensor
    exact: Callable[[], torch.Tensor]
    approx: Callable[[SamplingConfig], torch.Tensor]
    n: int  # pairs: input features / input channels
    approx_weight: torch.Tensor | None = None  # the approximate op's own copy of the weight (another layout), if any

    @property
    def weights(self) -> list[torch.Tensor]:
        return [self.weight] + ([self.approx_weight] if self.approx_weight is not None else [])

    def step(self, forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            self.input.grad = None
            for weight in self.weights:
                weight.grad = None
            forward().backward(self.grad_output)
        return run


def linear_case(batch: int, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype,
                generator: torch.Generator, weight_layout: str = "column") -> OpCase:
    """The exact op multiplies ``nn.Linear``'s row-major weight; the approximate one the same
    values laid out as ``ApproxLinear`` stores them (column-major by default)."""
    x = torch.randn(batch, in_features, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(out_features, in_features, device=device, dtype=dtype) / in_features ** 0.5).requires_grad_()
    w_approx = w.detach().t().contiguous().t().requires_grad_() if weight_layout == "column" else w
    grad = torch.randn(batch, out_features, device=device, dtype=dtype)
    return OpCase(
        name="linear", label=f"linear {batch}x{in_features}->{out_features}",
        shape={"batch": batch, "in_features": in_features, "out_features": out_features, "approx_weight_layout": weight_layout},
        input=x, weight=w, grad_output=grad,
        exact=lambda: F.linear(x, w),
        approx=lambda config: approx_linear(x, w_approx, None, config, generator),
        n=in_features, approx_weight=w_approx if w_approx is not w else None,
    )


def conv_case(batch: int, channels: int, out_channels: int, kernel: int, size: int, device: torch.device, dtype: torch.dtype,
              channels_last: bool, generator: torch.Generator) -> OpCase:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_()
    fan_in = channels * kernel * kernel
    w = (torch.randn(out_channels, channels, kernel, kernel, device=device, dtype=dtype) / fan_in ** 0.5)
    w = w.contiguous(memory_format=memory_format).requires_grad_()
    padding = kernel // 2
    out_size = size + 2 * padding - kernel + 1
    grad = torch.randn(batch, out_channels, out_size, out_size, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    return OpCase(
        name="conv2d", label=f"conv2d {batch}x{channels}x{size}x{size}->{out_channels} {kernel}x{kernel}",
        shape={"batch": batch, "in_channels": channels, "out_channels": out_channels, "kernel": kernel, "size": size,
               "padding": padding, "channels_last": channels_last},
        input=x, weight=w, grad_output=grad,
        exact=lambda: F.conv2d(x, w, None, 1, padding),
        approx=lambda config: approx_conv2d(x, w, None, 1, padding, 1, config, generator),
        n=channels,
    )


def profiled_pieces(step: Callable[[], None], device: torch.device, steps: int) -> dict[str, float]:
    """Mean per-step time (ms) inside the op's own profiler ranges over ``steps`` real steps:
    ``select`` (pair norms + sampler), ``gathers`` (sampled input and weight slices, forward and
    backward) and ``scatter`` (spreading the sampled gradients into full-size ones).

    Device time on CUDA, CPU time otherwise. The ranges time exactly what the op runs, so the
    pieces follow any change to its implementation.
    """
    step()  # one unprofiled step first
    seconds, _ = range_seconds(step, device, steps)
    names = {SELECT_RANGE: "select", GATHER_RANGE: "gathers", SCATTER_RANGE: "scatter"}
    return {names[key]: value * 1e3 for key, value in seconds.items()}


def saved_bytes(case: OpCase, forward: Callable[[], torch.Tensor]) -> dict[str, int]:
    """Bytes of the tensors one forward saves for backward: all, and without the weight parameter."""
    weight_storages = {weight.untyped_storage().data_ptr() for weight in case.weights}
    seen: dict[tuple, tuple[int, bool]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        seen[key] = (t.numel() * t.element_size(), t.untyped_storage().data_ptr() in weight_storages)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = forward()
    del output
    total = sum(size for size, _ in seen.values())
    without_weight = sum(size for size, is_weight in seen.values() if not is_weight)
    return {"all": total, "without_weight": without_weight, "tensors": len(seen)}


def cuda_peak_bytes(case: OpCase, step: Callable[[], None], device: torch.device) -> int | None:
    """Peak allocation of one fwd+bwd step above the allocation before it, gradients freed (CUDA only)."""
    if device.type != "cuda":
        return None
    case.input.grad = None
    for weight in case.weights:
        weight.grad = None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# ----------------------------------------------------------------------------- run


def benchmark(case: OpCase, ratios: list[float], policy: str, generator: torch.Generator, device: torch.device,
              warmup: int, repeats: int) -> list[dict]:
    configs = {ratio: SamplingConfig(policy, ratio=ratio) for ratio in ratios}
    steps = {"exact": case.step(case.exact)}
    for ratio, config in configs.items():
        steps[f"approx@{ratio:g}"] = case.step(lambda config=config: case.approx(config))
    times = time_interleaved(steps, device, warmup, repeats)
    exact = quartiles(times["exact"])
    exact_saved = saved_bytes(case, case.exact)
    exact_peak = cuda_peak_bytes(case, steps["exact"], device)

    rows = []
    for ratio, config in configs.items():
        name = f"approx@{ratio:g}"
        approx = quartiles(times[name])
        k = config.k(case.n)
        # Per-round ratios pair each approximate step with the exact step of the same round: robust to
        # load from other processes that drifts over the run (the plain ratio of medians is kept too).
        paired = quartiles([e / a for e, a in zip(times["exact"], times[name])])
        relative = quartiles([a / e for e, a in zip(times["exact"], times[name])])
        row = {
            "op": case.name, "case": case.label, "shape": case.shape, "policy": policy, "ratio": ratio, "k": k, "n": case.n,
            "ratio_effective": k / case.n,
            "exact_ms": exact, "approx_ms": approx,
            "exact_times_ms": times["exact"], "approx_times_ms": times[name],
            "speedup": paired["median"],
            "speedup_quartiles": paired,
            "speedup_of_medians": exact["median"] / approx["median"],
            "flop_bound": case.n / k,
            "fraction_of_bound": paired["median"] / (case.n / k),
            "overhead": relative["median"] - 1.0 if k >= case.n else None,
            "saved_bytes": {"exact": exact_saved, "approx": saved_bytes(case, lambda config=config: case.approx(config))},
            "cuda_peak_bytes": {"exact": exact_peak, "approx": cuda_peak_bytes(case, steps[name], device)},
        }
        if k < case.n or not get_policy(policy).fixed_k:  # (a variable-k policy's pieces are shown at ratio 1.0 too)
            pieces = profiled_pieces(steps[name], device, steps=max(repeats // 2, 3))
            selection_ms = pieces["select"] + pieces["gathers"]
            row.update({
                "pieces_ms": pieces,
                "selection_ms": selection_ms,
                "selection_share": selection_ms / exact["median"],
                "scatter_share": pieces["scatter"] / exact["median"],
            })
        else:  # the op takes the exact path: nothing is selected
            row.update({"pieces_ms": None, "selection_ms": 0.0, "selection_share": 0.0, "scatter_share": 0.0})
        rows.append(row)
    return rows


def targets(rows: list[dict]) -> list[dict]:
    checks = []
    for case in dict.fromkeys(r["case"] for r in rows):
        by_ratio = {r["ratio"]: r for r in rows if r["case"] == case}
        which = {"op": next(iter(by_ratio.values()))["op"], "case": case}
        if 0.5 in by_ratio:
            s = by_ratio[0.5]["speedup"]
            checks.append({**which, "target": f"speedup at ratio 0.5 >= {TARGET_SPEEDUP_AT_HALF}x", "measured": s,
                           "pass": s >= TARGET_SPEEDUP_AT_HALF})
        if 1.0 in by_ratio:
            o = by_ratio[1.0]["overhead"]
            checks.append({**which, "target": f"overhead at ratio 1.0 <= {TARGET_OVERHEAD_AT_ONE:.0%}", "measured": o,
                           "pass": o <= TARGET_OVERHEAD_AT_ONE})
        sampled = [r for r in by_ratio.values() if r["k"] < r["n"]]
        if sampled:
            worst = max(sampled, key=lambda r: r["selection_share"])
            checks.append({**which, "target": f"selection <= {TARGET_SELECTION_SHARE:.0%} of the exact op",
                           "measured": worst["selection_share"], "at_ratio": worst["ratio"],
                           "pass": worst["selection_share"] <= TARGET_SELECTION_SHARE})
    return checks


def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far; None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    own = os.times()
    return (sum(fields[:8]) - idle) / ticks, own.user + own.system


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def print_table(rows: list[dict]) -> None:
    header = (f"{'op':<7}{'ratio':>6}{'k/n':>11}{'exact ms':>10}{'(IQR)':>8}{'approx ms':>11}{'(IQR)':>8}{'speedup':>9}"
              f"{'(IQR)':>12}{'of medians':>11}{'bound':>7}{'of bound':>10}{'select':>8}{'scatter':>9}{'saved MiB exact->approx':>26}")
    print(header)
    for i, r in enumerate(rows):
        if i == 0 or r["case"] != rows[i - 1]["case"]:
            print(f"-- {r['case']} ".ljust(len(header), "-"))
        saved = f"{mib(r['saved_bytes']['exact']['without_weight'])}->{mib(r['saved_bytes']['approx']['without_weight'])}"
        saved_all = f" ({mib(r['saved_bytes']['exact']['all'])}->{mib(r['saved_bytes']['approx']['all'])})"
        print(f"{r['op']:<7}{r['ratio']:>6g}{r['k']:>6}/{r['n']:<4}{r['exact_ms']['median']:>10.2f}{r['exact_ms']['iqr']:>8.2f}"
              f"{r['approx_ms']['median']:>11.2f}{r['approx_ms']['iqr']:>8.2f}{r['speedup']:>8.2f}x"
              f"{r['speedup_quartiles']['q1']:>6.2f}-{r['speedup_quartiles']['q3']:<5.2f}{r['speedup_of_medians']:>10.2f}x{r['flop_bound']:>6.2f}x"
              f"{r['fraction_of_bound']:>10.0%}{r['selection_share']:>8.1%}{r['scatter_share']:>9.1%}{saved + saved_all:>26}")
    print("speedup = median over rounds of exact/approx in the same round (IQR of that ratio); "
          "'of medians' = exact median / approx median;")
    print("select = (norms + sampler + gathers) / exact fwd+bwd; scatter = spreading gradients to full size / exact fwd+bwd")
    print("(both from the op's profiler ranges over real steps);")
    print("saved = bytes saved for backward without the weight parameter (all saved tensors in parentheses).")
    for r in rows:
        if r["cuda_peak_bytes"]["exact"] is not None:
            print(f"CUDA peak above baseline, {r['case']} @ {r['ratio']:g}: exact {mib(r['cuda_peak_bytes']['exact'])} MiB, "
                  f"approx {mib(r['cuda_peak_bytes']['approx'])} MiB")
    for r in rows:
        if r["pieces_ms"]:
            p = r["pieces_ms"]
            print(f"pieces {r['case']} @ {r['ratio']:g} (ms per step): norms + sampler {p['select']:.2f}, "
                  f"gathers {p['gathers']:.2f}, scatter {p['scatter']:.2f}")


def parse_ints(text: str, count: int, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{name}={text!r} is invalid; allowed: {count} positive integers separated by commas")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--linear", nargs="+", default=["512,4096,4096"],
                        help="B,IN,OUT of each linear case (default 512,4096,4096); 'none' skips the linear")
    parser.add_argument("--linear-weight", default="column", choices=["column", "row"],
                        help="layout of the approximate linear's weight: column-major as ApproxLinear stores it (default), "
                             "or row-major as nn.Linear's (the exact baseline is always nn.Linear's row-major weight)")
    parser.add_argument("--conv", nargs="+", default=["64,256,256,3,32"],
                        help="B,C,O,K,H of each conv case, padding K//2 (default 64,256,256,3,32); 'none' skips the conv")
    parser.add_argument("--ratios", default="1.0,0.5,0.25", help="sampling ratios, comma separated (default 1.0,0.5,0.25)")
    parser.add_argument("--policy", default="topk", choices=[p for p in POLICIES if get_policy(p).samples],
                        help="sampler policy (default topk)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--channels-last", action="store_true", help="conv input and weight in channels_last")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default: 2 on CPU, 10 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 7 on CPU, 50 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)

    try:
        ratios = [float(r) for r in args.ratios.split(",")]
        for r in ratios:
            SamplingConfig(args.policy, ratio=r)
        linears = [] if args.linear == ["none"] else [parse_ints(shape, 3, "--linear") for shape in args.linear]
        convs = [] if args.conv == ["none"] else [parse_ints(shape, 5, "--conv") for shape in args.conv]
    except (ValueError, argparse.ArgumentTypeError) as error:
        parser.error(str(error))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda but CUDA is not available; allowed here: cpu, auto")
    device = torch.device("cuda" if args.device == "cuda" or args.device == "auto" and torch.cuda.is_available() else "cpu")
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 2)
    repeats = args.repeats if args.repeats is not None else (50 if device.type == "cuda" else 7)
    if warmup < 0 or repeats < 1:
        parser.error(f"--warmup={warmup}, --repeats={repeats}; allowed: warmup >= 0, repeats >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    torch.backends.cudnn.benchmark = True  # CUDA: each conv shape picks its fastest algorithm in the warm-up steps

    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    meta = {
        "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "dtype": args.dtype, "channels_last": args.channels_last, "policy": args.policy,
        "warmup": warmup, "repeats": repeats, "ratios": ratios, "seed": args.seed,
        "python": platform.python_version(), "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "malloc": "keeps freed memory" if retain_freed_memory() else "system defaults",
    }
    print(f"device {meta['device_name']} ({device.type}), torch {meta['torch']}, {meta['threads']} threads, {args.dtype}, "
          f"policy {args.policy}, warmup {warmup}, repeats {repeats}, load average {meta['load_average_start']}, "
          f"malloc: {meta['malloc']}")

    started, cpu_before = time.perf_counter(), cpu_seconds()
    rows: list[dict] = []
    cases = [lambda shape=shape: linear_case(*shape, device, dtype, generator, args.linear_weight) for shape in linears]
    cases += [lambda shape=shape: conv_case(*shape, device, dtype, args.channels_last, generator) for shape in convs]
    for make_case in cases:  # one case's tensors alive at a time
        rows += benchmark(make_case(), ratios, args.policy, generator, device, warmup, repeats)
    meta["seconds"] = time.perf_counter() - started
    cpu_after = cpu_seconds()
    if cpu_before is not None and cpu_after is not None:
        # CPU time other processes took during the run: timings are only clean when this is near 0.
        other = max(0.0, (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1]))
        meta["other_processes_cpu_share"] = other / (meta["seconds"] * (os.cpu_count() or 1))
    meta["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    print()
    print_table(rows)
    checks = targets(rows)
    print("\nTargets:")
    for c in checks:
        value = (f"{c['measured']:.2f}x" if "speedup" in c["target"]
                 else f"{c['measured']:+.1%}" if "overhead" in c["target"] else f"{c['measured']:.1%}")
        where = f" (worst, at ratio {c['at_ratio']:g})" if "at_ratio" in c else ""
        print(f"[{'PASS' if c['pass'] else 'FAIL'}] {c['case']}: {c['target']}: measured {value}{where}")
    share = meta.get("other_processes_cpu_share")
    print(f"\n{meta['seconds']:.0f} s, load average at end {meta['load_average_end']}"
          + ("" if share is None else f", other processes used {share:.0%} of the machine's CPU time during the run"))

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": rows, "targets": checks}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

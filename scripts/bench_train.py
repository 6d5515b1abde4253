"""End-to-end training-step benchmark: exact vs approximate, in one process.

For each registered model (MLP, CNN, LSTM, WRN-28-10, ResNet-50), configured as
`approxtrain model=<name> sampler=topk ratio=<ratio>` composes it (the paper's layer
rules) and fed random data with the shapes of its paper dataset, times the median training step (forward, backward, optimizer step)
of exact training and of ``sampler=topk`` at each ratio with the paper's layer
rules, after warm-up, with device synchronisation. Reports per row: median step
time, speedup vs exact (same run), the FLOP bound 1/(1 - compute reduction) and
the fraction of it reached, the share of the step spent in selection (norms +
top-k) and in gathers/scatters (from profiler ranges), the activation memory autograd
saves for backward in one forward pass and, on CUDA, the peak memory one step allocates
above what was allocated before it. Without ``--compile`` the configurations of a model
are timed round by round (one step of each in turn) and the speedup is the median of the
per-round ratios; with it each configuration is compiled and timed in turn. With ``--cuda-graphs``
each configuration's whole step (forward, backward, SGD step) is captured in one CUDA graph and
the rounds replay it: the step as it runs when the host launches nothing, the bound on what
removing the host from the step (``trainer.cuda_graphs``, compile's CUDA graphs) can give.

    python scripts/bench_train.py                       # all models, CPU-sized batches on CPU
    python scripts/bench_train.py --models wrn resnet50 --device cuda --amp bf16 --channels-last
    python scripts/bench_train.py --json outputs/bench_train.json
    python scripts/bench_train.py --models wrn --kernel-profile outputs/   # + outputs/profile_wrn.txt
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import approxtrain
except ModuleNotFoundError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import approxtrain.cli.config_store  # noqa: F401  (the config nodes made from code)
from approxtrain import ComputeMeter, approximate_, attach_meter, kernels
from approxtrain.cli.allocator import retain_freed_memory
from approxtrain.config import layer_rules
from approxtrain.data import DatasetInfo
from approxtrain.data.synthetic import like_info
from approxtrain.models import build_model, list_models
from approxtrain.profiling import GATHER_RANGE, SCATTER_RANGE, SELECT_RANGE, device_name, kernel_table, range_seconds

# Batches other than the paper dataset's batch_size, sized to one device: CUDA, CPU.
CUDA_BATCH = {"resnet50": 128}
CPU_BATCH = {"wrn": 8, "resnet50": 4}


def _run_config(name: str, align_k: int) -> dict:
    """The resolved config of ``approxtrain model=<name> sampler=topk sampler.align_k=<align_k>``
    (the paper's dataset and layer rules); its ``ratio`` is set per configuration."""
    with initialize_config_module("approxtrain.configs", version_base="1.3"):
        cfg = compose("train", [f"model={name}", "sampler=topk", f"sampler.align_k={align_k}", "logger=none"])
    return OmegaConf.to_container(cfg, resolve=True)


def _batch(info: DatasetInfo, batch: int, device: torch.device, channels_last: bool, image_size: int | None, seq_len: int):
    if info.kind == "text":
        x = torch.randint(info.vocab_size, (batch, seq_len), device=device)
        return x, torch.randint(info.vocab_size, (batch, seq_len), device=device)
    size = (image_size, image_size) if image_size else info.image_size
    x = torch.randn(batch, info.in_channels, *size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(info.num_classes, (batch,), device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(model, optimizer, x, y, info, amp: torch.dtype | None, device, cache_casts: bool = True) -> None:
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None, cache_enabled=cache_casts):
        out = model(x)
    if info.kind == "text":
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))
    else:
        loss = F.cross_entropy(out.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


def _saved_activation_bytes(model, x, y, info, amp, device) -> int:
    """Bytes autograd saves for backward in one forward pass (the activation memory)."""
    total = 0
    seen: set[int] = set()

    def pack(tensor):
        nonlocal total
        key = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key not in seen and not isinstance(tensor, nn.Parameter):
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
    del out
    return total


def _profiled_shares(model, optimizer, x, y, info, amp, device, profile_steps: int) -> dict[str, float]:
    """Shares of a step spent in the op's selection and gather/scatter profiler ranges."""
    seconds, wall = range_seconds(lambda: _step(model, optimizer, x, y, info, amp, device), device, profile_steps)
    return {"select": seconds[SELECT_RANGE] / wall, "gather_scatter": (seconds[GATHER_RANGE] + seconds[SCATTER_RANGE]) / wall}


def _step_peak_bytes(model, optimizer, x, y, info, amp, device) -> int | None:
    """CUDA: peak allocation during one step above what was allocated before it (activations,
    gradients, temporaries); None on CPU."""
    if device.type != "cuda":
        return None
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(model, optimizer, x, y, info, amp, device)
    _sync(device)
    return torch.cuda.max_memory_allocated() - before


def _measure(models: list, info, batch, device, amp, channels_last, image_size, seq_len, warmup, repeats: int | None,
             profile_steps: list[int]) -> list[dict]:
    """Times the training step of each model on the same batch, round by round: every round
    runs one step of each model in turn, so drifting machine load hits all of them alike.
    ``repeats=None``: as many rounds as fit in about 3 s of the first model's steps (5 to 200)."""
    x, y = _batch(info, batch, device, channels_last, image_size, seq_len)
    runs = []
    for model in models:
        model.train()
        runs.append((model, _optimizer(model), getattr(model, "reset_state", None)))
    for model, optimizer, _ in runs:
        for _ in range(warmup):
            _step(model, optimizer, x, y, info, amp, device)
    _sync(device)
    if repeats is None:
        start = time.perf_counter()
        _step(runs[0][0], runs[0][1], x, y, info, amp, device)
        _sync(device)
        repeats = max(5, min(200, int(3.0 / max(time.perf_counter() - start, 1e-6))))
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for i, (model, optimizer, reset) in enumerate(runs):
            if callable(reset):
                reset()
            _sync(device)
            start = time.perf_counter()
            _step(model, optimizer, x, y, info, amp, device)
            _sync(device)
            times[i].append(time.perf_counter() - start)
    results = []
    for (model, optimizer, _), run_times, steps in zip(runs, times, profile_steps):
        shares = _profiled_shares(model, optimizer, x, y, info, amp, device, steps) if steps else {"select": 0.0, "gather_scatter": 0.0}
        q1, _, q3 = statistics.quantiles(run_times, n=4) if len(run_times) >= 2 else (run_times[0], 0, run_times[0])
        results.append({"median_s": statistics.median(run_times), "iqr_s": q3 - q1, "times_s": run_times, "rounds": len(run_times),
                        "step_peak_bytes": _step_peak_bytes(model, optimizer, x, y, info, amp, device),
                        "saved_activation_bytes": _saved_activation_bytes(model, x, y, info, amp, device),
                        "select_share": shares["select"], "gather_scatter_share": shares["gather_scatter"]})
    return results


def _graphed_step(model, optimizer, x, y, info, amp, device, warmup: int):
    """``model``'s training step captured in one CUDA graph (PyTorch's whole-network capture: warm-up
    steps on a side stream, the gradients unset so that backward allocates them in the graph's pool,
    autocast without its cast cache); returns the graph's ``replay``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(warmup, 3)):
            _step(model, optimizer, x, y, info, amp, device, cache_casts=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None, cache_enabled=False):
            out = model(x)
        loss = F.cross_entropy((out.reshape(-1, out.shape[-1]) if info.kind == "text" else out).float(),
                               y.reshape(-1) if info.kind == "text" else y)
        loss.backward()
        optimizer.step()
    return graph.replay


def _measure_graphed(models: list, info, batch, device, amp, channels_last, image_size, seq_len, warmup,
                     repeats: int | None) -> list[dict]:
    """As :func:`_measure`, each round replaying every model's captured step in turn (``repeats=None``: 50 rounds)."""
    x, y = _batch(info, batch, device, channels_last, image_size, seq_len)
    replays = []
    for model in models:
        model.train()
        replays.append(_graphed_step(model, _optimizer(model), x, y, info, amp, device, warmup))
    times: list[list[float]] = [[] for _ in replays]
    for _ in range(repeats or 50):
        for i, replay in enumerate(replays):
            _sync(device)
            start = time.perf_counter()
            replay()
            _sync(device)
            times[i].append(time.perf_counter() - start)
    results = []
    for run_times in times:
        q1, _, q3 = statistics.quantiles(run_times, n=4) if len(run_times) >= 2 else (run_times[0], 0, run_times[0])
        results.append({"median_s": statistics.median(run_times), "iqr_s": q3 - q1, "times_s": run_times, "rounds": len(run_times),
                        "step_peak_bytes": None, "saved_activation_bytes": 0, "select_share": 0.0, "gather_scatter_share": 0.0})
    return results


def _config_name(ratio: float, backend: str = "torch", every: int = 1) -> str:
    name = "exact" if ratio == 1.0 else f"topk {ratio:g}" + (f" reselect {every}" if every > 1 else "")
    return name if backend == "torch" else f"{name} [{backend}]"


def _with_kernels(model: nn.Module, backend: str) -> nn.Module:
    """``model``, choosing the kernel backend at each forward (its backward follows in the same step)."""
    model.register_forward_pre_hook(lambda module, args: kernels.set_backend(backend))
    return model


def _write_kernel_profile(path: Path, name: str, models: list[tuple[float, nn.Module, str]], info, batch, device, amp,
                          channels_last, image_size, seq_len) -> None:
    """One profiled training step of each ``(ratio, model)`` (after one unprofiled step), as tables of top kernels, to ``path``."""
    x, y = _batch(info, batch, device, channels_last, image_size, seq_len)
    sections = [f"{name}: batch {batch}, input {tuple(x.shape)}, amp {amp}, channels_last {channels_last}, {_device_name(device)}, "
                f"torch {torch.__version__}; one training step (forward, backward, SGD step) per table\n"]
    for ratio, model, backend in models:
        optimizer = _optimizer(model)
        step = lambda: _step(model, optimizer, x, y, info, amp, device)  # noqa: E731, B023 - run within this iteration only
        step()
        sections.append(f"== {name}, {_config_name(ratio, backend)} ==\n{kernel_table(step, device)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(sections))
    print(f"wrote {path}", flush=True)


def _device_name(device: torch.device) -> str:
    return device_name(device) if device.type == "cuda" else f"{device_name(device)} ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list_models(), choices=list_models())
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="batch size(s), each run for every model (default: paper batch on CUDA, a CPU-sized one on CPU)")
    parser.add_argument("--reselect-every", type=int, default=1, help="also run the first ratio with "
                        "sampler.reselect_every=N (under the last --kernels backend); 1: not")
    parser.add_argument("--kernels", nargs="+", default=["torch"], help="kernel backends of the approximate "
                        "configurations: torch (default), triton, triton:<pieces> (approxtrain.kernels.PIECES)")
    parser.add_argument("--image-size", type=int, default=None, help="override H=W of image models (e.g. 64 for a quick ResNet-50)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"], help="auto: bf16 on CUDA, off on CPU")
    parser.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"], help="auto: on for conv models on CUDA")
    parser.add_argument("--align-k", type=int, default=1, help="round k up to a multiple of this (8 for tensor cores)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    parser.add_argument("--cuda-graphs", action="store_true", help="capture each configuration's whole step in a "
                        "CUDA graph and time its replays (CUDA only; not with --compile; no --reselect-every)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor; aot_eager: "
                        "traces forward and backward without generating code, for quick checks)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: about 3 s of exact steps, 5 to 200)")
    parser.add_argument("--profile-steps", type=int, default=2, help="steps profiled for the selection share (0: skip)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--kernel-profile", type=Path, default=None, metavar="DIR",
                        help="write DIR/profile_<model>.txt: the top kernels (CPU: operators) of one exact and one step at the "
                             "first ratio, by self time (not with --compile)")
    args = parser.parse_args(argv)
    for name in args.kernels or []:  # torch, triton or triton:<pieces>
        try:
            kernels.parse_backend(name, "--kernels")
        except ValueError as error:
            parser.error(str(error))
    if args.cuda_graphs and (args.compile or args.kernel_profile or args.reselect_every > 1):
        parser.error("--cuda-graphs replays captured steps: not with --compile, --kernel-profile or --reselect-every "
                     "(its reuse counter lives on the host); allowed: --cuda-graphs alone")
    if args.compile and args.kernel_profile:
        parser.error("--kernel-profile with --compile: the profile is of eager steps; allowed: one or the other")
    if args.compile and args.compile_backend not in (backends := torch._dynamo.list_backends(exclude_tags=())):
        parser.error(f"--compile-backend={args.compile_backend!r} is unknown; allowed: {', '.join(backends)}")
    retain_freed_memory()  # like the CLI: glibc keeps freed memory (APPROXTRAIN_MALLOC=system: off)

    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.cuda_graphs and device.type != "cuda":
        parser.error(f"--cuda-graphs needs a CUDA device; the device here is {device.type}")
    if any(not 0 < r <= 1 for r in args.ratios):
        parser.error(f"--ratios {args.ratios}: each must be in (0, 1]")
    amp = torch.bfloat16 if args.amp == "bf16" or args.amp == "auto" and device.type == "cuda" else None
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 2)
    repeats = args.repeats  # None: sized per model from its step time
    torch.backends.cudnn.benchmark = True

    rows = []
    print(f"device: {_device_name(device)}, torch {torch.__version__}, amp {amp}, warmup {warmup}, "
          f"repeats {repeats or 'auto (~3 s, 5-200)'}")
    header = (f"{'model':<9} {'batch':>5} {'config':<18} {'step ms':>9} {'speedup':>8} {'reduction':>9} {'bound':>6} "
              f"{'of bound':>8} {'select':>7} {'gath/sc':>7} {'act MB':>8} {'step MB':>8}")
    print(header)
    for name, batch_choice in [(name, batch) for name in args.models for batch in (args.batch or [None])]:
        cfg = _run_config(name, args.align_k)
        info, seq_len = like_info(cfg["model"]["paper_dataset"]), cfg["dataset"].get("seq_len")
        batch = batch_choice or (CUDA_BATCH if device.type == "cuda" else CPU_BATCH).get(name, cfg["dataset"]["batch_size"])
        torch.manual_seed(0)
        base = build_model(cfg["model"], info).to(device)
        channels_last = any(isinstance(module, nn.Conv2d) for module in base.modules()) and (
            args.channels_last == "on" or args.channels_last == "auto" and device.type == "cuda")
        if channels_last:
            base = base.to(memory_format=torch.channels_last)
        example = _batch(info, 2, device, channels_last, args.image_size, seq_len)[0]
        variants = [(1.0, "torch", 1)] + [(ratio, backend, 1) for ratio in args.ratios for backend in args.kernels]
        if args.reselect_every > 1:  # and the first ratio reusing its selections, under the last backend
            variants.append((args.ratios[0], args.kernels[-1], args.reselect_every))
        configs = []  # (ratio, planned reduction, meter, model as stepped)
        for ratio, backend, every in variants:
            model = _with_kernels(copy.deepcopy(base), backend)
            reduction = 0.0
            if ratio < 1.0:
                rules = layer_rules({**cfg, "ratio": ratio, "sampler": {**cfg["sampler"], "reselect_every": every}})
                reduction = approximate_(model, rules, example_input=example, batch_size=batch).compute_reduction
            meter = ComputeMeter()
            attach_meter(model, meter)
            configs.append((ratio, reduction, meter, model))
        profile = [args.profile_steps if ratio < 1.0 else 0 for ratio, *_ in variants]
        measure = (info, batch, device, amp, channels_last, args.image_size, seq_len, warmup, repeats)
        if args.compile:
            # a fresh compile per configuration, measured before the next one is compiled, as in a
            # training run: models of one class would otherwise share (and generalise) one cache entry
            # the sampled configurations first: a run cut short by a time limit has printed theirs
            measured = {}
            for i in [*range(1, len(configs)), 0]:
                (ratio, _, _, model), (_, backend, every) = configs[i], variants[i]
                torch._dynamo.reset()
                started = time.perf_counter()
                measured[i] = _measure([torch.compile(model, backend=args.compile_backend)], *measure, [profile[i]])[0]
                print(f"{name}: {_config_name(ratio, backend, every)} compiled ({args.compile_backend}) and measured in "
                      f"{time.perf_counter() - started:.0f} s, median step {measured[i]['median_s'] * 1000:.1f} ms", flush=True)
            results = [measured[i] for i in range(len(configs))]
        elif args.cuda_graphs:
            results = _measure_graphed([model for *_, model in configs], *measure)
        else:
            results = _measure([model for *_, model in configs], *measure, profile)
        exact_times = results[0]["times_s"]
        for (ratio, reduction, meter, _), (_, backend, every), result in zip(configs, variants, results):
            # per-round ratios pair each step with the exact step of the same round (compiled: the plain ratio of medians)
            paired = [e / a for e, a in zip(exact_times, result["times_s"])]
            speedup = statistics.median(paired) if not args.compile else results[0]["median_s"] / result["median_s"]
            bound = 1 / (1 - reduction) if reduction < 1 else float("inf")
            row = {"model": name, "batch": batch, "ratio": ratio, "config": _config_name(ratio, backend, every), "kernels": backend,
                   "reselect_every": every, "cuda_graphs": args.cuda_graphs,
                   "planned_compute_reduction": reduction, "measured_compute_reduction": meter.compute_reduction,
                   "speedup": speedup, "speedup_of_medians": results[0]["median_s"] / result["median_s"],
                   "flop_bound": bound, "fraction_of_bound": speedup / bound, **result}
            rows.append(row)
            peak = f"{result['step_peak_bytes'] / 2**20:8.0f}" if result["step_peak_bytes"] else f"{'n/a':>8}"
            print(f"{name:<9} {batch:>5} {row['config']:<18} {result['median_s'] * 1000:9.1f} {speedup:7.2f}x {reduction:9.1%} "
                  f"{bound:5.2f}x {row['fraction_of_bound']:8.2f} {result['select_share']:7.1%} {result['gather_scatter_share']:7.1%} "
                  f"{result['saved_activation_bytes'] / 2**20:8.1f} {peak}", flush=True)
        if args.kernel_profile:  # exact and each backend's first ratio; the first batch's as profile_<model>.txt
            profiled = [(ratio, model, backend) for (ratio, _, _, model), (_, backend, every) in zip(configs, variants)
                        if ratio in (1.0, args.ratios[0]) and every == 1]
            suffix = "" if args.batch is None or batch_choice == args.batch[0] else f"_b{batch}"
            _write_kernel_profile(args.kernel_profile / f"profile_{name}{suffix}.txt", name, profiled, info, batch, device, amp,
                                  channels_last, args.image_size, seq_len)
        del configs, results
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": _device_name(device), "torch": torch.__version__, "amp": str(amp),
                                         "cuda_graphs": args.cuda_graphs, "warmup": warmup, "repeats": repeats, "rows": rows},
                                        indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

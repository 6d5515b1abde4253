#!/usr/bin/env bash
# One command for a CUDA machine: the CUDA and kernel tests, the ceiling probe, the user's headline
# command end to end, the step benchmark (eager) and torch.compile, in at most 6 minutes, with every
# result under $OUT and a summary that marks each goal of issue 18 met or unmet.
#
#   bash scripts/gpu_check.sh            # the full check; needs CUDA
#   bash scripts/gpu_check.sh --smoke    # every stage, shrunk, on CUDA or the CPU (a minute or two)
#   GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh          # the same as --smoke
#   GPU_CHECK_STAGES="probe e2e" bash scripts/gpu_check.sh   # only these stages
#
# Needs torch, torchvision, triton (CUDA builds of torch ship it) and pytest, plus hydra-core and
# omegaconf for the end-to-end stages; never wandb. On a machine without hydra, carry the pure-Python
# wheels: run `bash ../shared/tools/device-prep.sh` here once (it fills .whl/), carry ".whl", and this
# script installs them into a temp dir by itself. The checkout need not be installed: the script
# lays out the package as an install would (approxtrain/ with configs/ as approxtrain.configs,
# symlinked into a temp dir) and puts that first on PYTHONPATH. tests/conftest.py imports hydra
# for its fixtures; the tests stage needs none of them, so it runs pytest with --noconftest and
# without other packages' plugins (PYTEST_DISABLE_PLUGIN_AUTOLOAD).
#
# Stages, in order; each runs under `timeout`, a failing or timed-out stage does not stop the next,
# and the exit status is non-zero if any stage did not pass. Each stage's limit is min(its cap
# (`caps` below), what is left of GPU_CHECK_BUDGET_S, default 345 s), so the whole run ends within
# 6 minutes whatever happens (SIGKILL 10 s after SIGTERM; the report ~1 s). Full run:
#   tests     (cap  40 s) tests/test_cuda.py (no host sync in a sampled step; CUDA = CPU) and
#             tests/test_kernels.py (every Triton kernel, compiled, = the torch path).
#   host      (cap  20 s) scripts/bench_host.py: the host's microseconds per sampled layer call
#             (forward + backward on tiny operands: the launch-bound regime) and the operators it
#             dispatches, exact / ratio 1.0 / topk / nps / topk reselecting every 4, per backend.
#   probe     (cap  75 s) scripts/gpu_probe.py, bf16, topk 0.5: per shape (linear 8192x4096->4096
#             and 512x4096->4096; conv 256x256->256 3x3 @32^2; the WRN-28-10 3x3 convs 160@32^2,
#             320@16^2, 640@8^2 at batch 128; the ResNet-50 3x3 convs 64@56^2 .. 512@7^2 at batch 256)
#             the exact fwd+bwd, the ceiling (the dense op with k input features/channels), the
#             approximate op under each kernel backend (torch, triton), ratio 1.0, and each sampling
#             piece alone (scores, top-k, gathers, gradient spreads) per backend.
#   e2e       (cap  60 s) scripts/gpu_e2e.py: `approxtrain model=wrn dataset=synthetic
#             dataset.batch_size=128 sampler=exact|topk ratio=0.5 logger=none trainer.epochs=1` (64
#             steps), topk under both backends; the median step from each run's results.json.
#   train     (cap  70 s) scripts/bench_train.py WRN-28-10 at batch 128 and 512, bf16 autocast +
#             channels_last, exact vs topk 0.5 under both backends and with sampler.reselect_every=4,
#             interleaved rounds; kernel profiles of exact and topk 0.5 (profile_wrn.txt).
#   train_resnet50 (cap 60 s) the same for ResNet-50 at batch 256, 224x224 (profile_resnet50.txt).
#   compile_wrn (cap 80 s) bench_train.py --compile (inductor), WRN-28-10 batch 128, topk 0.5
#             under the triton backend first (its compile seconds are the goal's), then exact.
#   graphs    (cap 35 s; CUDA only, so not in --smoke on a CPU) bench_train.py --cuda-graphs: WRN-28-10
#             batch 128, exact and topk 0.5 per backend, each whole step captured in one CUDA graph and
#             replayed: the step with no host launches, what trainer.cuda_graphs could give (not a goal).
# --smoke: the same stages, shrunk: the host cost over 5 calls x 2 rounds, the probe's tiny shapes
# (and the Triton kernels under the interpreter on a CPU), the headline command on the MLP at batch 8,
# bench_train on the CNN and MLP at batch 2 (1 warm-up, 1 round; torch kernels on a CPU: the
# interpreter is far too slow for them), compile with backend aot_eager, graphs on CUDA only; each
# stage capped at 300 s (a loaded 2-core machine needs it).
#
# Results ($OUT, default a new temp dir; at most 8 files, the device tool's limit):
#   gpu_check.json     environment, per stage: status, exit code, seconds, limit, command and its
#                      results (pytest counts; each script's JSON), and the goals, each met/unmet
#   gpu_check.txt      the summary (goals, ratios against the measured ceiling), the stage table,
#                      then every stage's printed output (failing stages: the end of their stderr)
#   gpu_check.log      every stage's stderr in full
#   profile_wrn.txt, profile_resnet50.txt   top kernels of one step of exact and of topk 0.5 per
#                      backend (smoke: profile_cnn.txt, profile_mlp.txt)
#
# Other settings: PYTHON (default python3), GPU_CHECK_BUDGET_S (the run's time budget),
# GPU_CHECK_KERNELS (the kernel backends the stages compare; default "torch triton" on CUDA, "torch"
# on a CPU), e.g. GPU_CHECK_KERNELS="torch triton:scores,topk" GPU_CHECK_STAGES="e2e train".
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
smoke=${GPU_CHECK_SMOKE:-0}
if [[ $smoke != 0 && $smoke != 1 ]]; then
    echo "gpu_check.sh: GPU_CHECK_SMOKE='$smoke' is invalid; allowed: 0, 1" >&2
    exit 2
fi
for arg in "$@"; do
    case $arg in
        --smoke) smoke=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg'; allowed: --smoke, --help" >&2; exit 2 ;;
    esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2
PYTHON=${PYTHON:-python3}
declare -A caps  # each stage's cap in seconds; a stage missing here gets default_cap
if [[ $smoke == 1 ]]; then
    budget=${GPU_CHECK_BUDGET_S:-900}
    default_cap=300
    probe_args=(--smoke)
    host_args=(--calls 5 --repeats 2)
    graphs_args=(--models cnn --batch 2 --warmup 1 --repeats 2)
    e2e_args=(--smoke)
    train_wrn=(--models cnn --batch 2 --warmup 1 --repeats 1 --profile-steps 1)
    train_resnet50=(--models mlp --batch 2 --warmup 1 --repeats 1 --profile-steps 1)
    compile_args=(--models cnn --batch 2 --warmup 1 --repeats 1 --compile-backend aot_eager)
else
    budget=${GPU_CHECK_BUDGET_S:-345}
    default_cap=60
    caps=([tests]=40 [host]=20 [probe]=75 [e2e]=60 [train]=70 [train_resnet50]=60 [compile_wrn]=80 [graphs]=35)
    probe_args=()
    host_args=(--calls 100 --repeats 7)
    graphs_args=(--models wrn --batch 128 --warmup 3 --repeats 30)
    e2e_args=()
    train_wrn=(--models wrn --batch 128 512)  # rounds for ~3 s per configuration
    train_resnet50=(--models resnet50 --batch 256)
    compile_args=(--models wrn --batch 128 --warmup 3 --repeats 20)
fi
if ! [[ $budget =~ ^[0-9]+$ ]]; then
    echo "gpu_check.sh: GPU_CHECK_BUDGET_S='$budget' is invalid; allowed: a whole number of seconds" >&2
    exit 2
fi
stages=(tests host probe e2e train train_resnet50 compile_wrn graphs)
for name in ${GPU_CHECK_STAGES:-}; do
    if [[ " ${stages[*]} " != *" $name "* ]]; then
        echo "gpu_check.sh: GPU_CHECK_STAGES names '$name'; allowed: ${stages[*]}" >&2
        exit 2
    fi
done

work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_work.XXXXXX") || exit 2
trap 'rm -rf "$work"' EXIT
# The package as an install lays it out (configs/ is approxtrain.configs), from the checkout's files
mkdir -p "$work/src/approxtrain"
for entry in "$root"/approxtrain/*; do ln -s "$entry" "$work/src/approxtrain/"; done
ln -s "$root/configs" "$work/src/approxtrain/configs"
export PYTHONPATH="$work/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
# hydra-core/omegaconf for the end-to-end stages: the carried wheels (device-prep.sh) when not installed
if ! "$PYTHON" -c 'import hydra, omegaconf' 2>/dev/null && compgen -G "$root/.whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$work/site" "$root"/.whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$work/site"
fi
# The environment, once: torch's version and the device (full: CUDA; smoke: CUDA, else the CPU).
if ! "$PYTHON" -c '
import json, sys, torch
cuda = torch.cuda.is_available()
json.dump({"torch": torch.__version__, "cuda": cuda, "device": torch.cuda.get_device_name() if cuda else "cpu"}, sys.stdout)
' >"$work/env.json"; then
    echo "gpu_check.sh: '$PYTHON' cannot import torch" >&2
    exit 2
fi
if grep -q '"cuda": true' "$work/env.json"; then
    device=cuda
    amp=bf16
    backends=(torch triton)
elif [[ $smoke == 1 ]]; then
    device=cpu
    amp=off
    backends=(torch)
else
    echo "gpu_check.sh: no CUDA device (torch.cuda.is_available() is False); --smoke runs the shrunk check anywhere" >&2
    exit 2
fi
if [[ -n ${GPU_CHECK_KERNELS:-} ]]; then  # each checked by approxtrain.kernels' own rule
    read -ra backends <<<"$GPU_CHECK_KERNELS"
    if ! invalid=$("$PYTHON" -c 'import sys
from approxtrain.kernels import parse_backend
try:
    for name in sys.argv[1:]:
        parse_backend(name, "GPU_CHECK_KERNELS")
except ValueError as error:
    sys.exit(str(error))' "${backends[@]}" 2>&1); then
        echo "gpu_check.sh: ${invalid##*$'\n'}" >&2
        exit 2
    fi
fi
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$OUT" || exit 2
deadline=$((SECONDS + budget))

# run_stage NAME COMMAND...: runs COMMAND (stdout and stderr to $work/NAME.out/.err) under
# min(its cap, seconds left) and appends its status line to $work/stages.tsv.
run_stage() {
    local name=$1
    shift
    if [[ -n ${GPU_CHECK_STAGES:-} && " $GPU_CHECK_STAGES " != *" $name "* ]]; then
        return
    fi
    local cap=${caps[$name]:-$default_cap} left=$((deadline - SECONDS)) start=$SECONDS rc=-1 status
    local limit=$((cap < left ? cap : left))
    if ((limit < 1)); then
        status=skipped
        : >"$work/$name.out"
        echo "no time left of GPU_CHECK_BUDGET_S=$budget" >"$work/$name.err"
    else
        echo "[gpu_check] $name: running, limit $limit s"
        timeout --kill-after=10 "$limit" "$@" >"$work/$name.out" 2>"$work/$name.err"
        rc=$?
        case $rc in
            0) status=pass ;;
            124 | 137) status=timeout ;;
            *) status=fail ;;
        esac
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - start))" "$limit" "$*" >>"$work/stages.tsv"
    echo "[gpu_check] $name: $status ($((SECONDS - start)) s)"
}

: >"$work/stages.tsv"
tests=(tests/test_cuda.py tests/test_kernels.py)
[[ $device == cpu ]] && tests+=(tests/test_kernels_interpreted.py)  # smoke on a CPU: the kernels interpreted
run_stage tests env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PYTHON" -m pytest -q --noconftest -p no:cacheprovider \
    --junitxml="$work/tests.xml" "${tests[@]}"
run_stage host "$PYTHON" scripts/bench_host.py --device "$device" --kernels "${backends[@]}" "${host_args[@]}" \
    --json "$work/host.json"
interpret=()
[[ $device == cpu ]] && interpret=(env TRITON_INTERPRET=1)  # the probe's tiny shapes run the kernels interpreted
run_stage probe "${interpret[@]}" "$PYTHON" scripts/gpu_probe.py --device "$device" "${probe_args[@]}" --json "$work/probe.json"
run_stage e2e "$PYTHON" scripts/gpu_e2e.py "${e2e_args[@]}" --kernels "${backends[@]}" --json "$work/e2e.json"
train=(scripts/bench_train.py --device "$device" --amp "$amp" --channels-last on --ratios 0.5 --kernels "${backends[@]}")
run_stage train "$PYTHON" "${train[@]}" "${train_wrn[@]}" --reselect-every 4 --kernel-profile "$OUT" --json "$work/train.json"
run_stage train_resnet50 "$PYTHON" "${train[@]}" "${train_resnet50[@]}" --kernel-profile "$OUT" --json "$work/train_resnet50.json"
run_stage compile_wrn "$PYTHON" scripts/bench_train.py --device "$device" --amp "$amp" --channels-last on --ratios 0.5 \
    --kernels "${backends[-1]}" --compile --profile-steps 0 "${compile_args[@]}" --json "$work/compile_wrn.json"
if [[ $device == cuda ]]; then
    run_stage graphs "$PYTHON" scripts/bench_train.py --device cuda --amp "$amp" --channels-last on --ratios 0.5 \
        --kernels "${backends[@]}" --cuda-graphs --profile-steps 0 "${graphs_args[@]}" --json "$work/graphs.json"
fi

# The report: gpu_check.json, gpu_check.txt and gpu_check.log from the stages' files.
"$PYTHON" - "$work" "$OUT" "$smoke" "$budget" <<'PY'
import datetime, json, subprocess, sys, xml.etree.ElementTree as ET
from pathlib import Path

work, out, smoke, budget = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])


def stage_results(name):
    if name == "tests":
        path = work / "tests.xml"
        if not path.exists():
            return None
        suite = ET.parse(path).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    path = work / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def best(rows, **match):
    """The fastest sampled row of a bench_train JSON matching ``match`` (either backend; the paper's
    estimator: not reusing selections)."""
    rows = [r for r in rows if r["ratio"] < 1 and r.get("reselect_every", 1) == 1 and all(r.get(k) == v for k, v in match.items())]
    return max(rows, key=lambda r: r["speedup"]) if rows else None


def goals(results):
    """Issue 18's goals from the stages' results: [(goal, measured, met: True/False/None = not measured)]."""
    found = []
    probe = results.get("probe") or {}
    for row in probe.get("rows", []):
        of = max(row["of_ceiling"].values())
        which = max(row["of_ceiling"], key=row["of_ceiling"].get)
        found.append((f"op {row['shape']}: approx >= 0.85 of the ceiling",
                      f"{of:.2f} ({which}; ceiling {row['ceiling_speedup']:.2f}x exact, approx {row['speedup']:.2f}x)", of >= 0.85))
        found.append((f"op {row['shape']}: sampling pieces <= 10% of exact", f"{row['pieces_share']:.1%}", row["pieces_share"] <= 0.10))
        found.append((f"op {row['shape']}: ratio 1.0 overhead <= 2%", f"{row['ratio1_overhead']:+.1%}", row["ratio1_overhead"] <= 0.02))
    train = (results.get("train") or {}).get("rows", []) + (results.get("train_resnet50") or {}).get("rows", [])
    for model, batch, target in (("wrn", 128, 1.0), ("wrn", 512, 1.3), ("resnet50", 256, 1.2)):
        row = best(train, model=model, batch=batch)
        found.append((f"e2e {model} batch {batch} topk 0.5 >= {target}x exact",
                      f"{row['speedup']:.2f}x ({row['config']})" if row else "not measured", row["speedup"] >= target if row else None))
    e2e = (results.get("e2e") or {}).get("rows", [])
    exact_bench = next((r for r in train if r["model"] == "wrn" and r["batch"] == 128 and r["ratio"] == 1), None)
    for row in e2e:
        bench = exact_bench if row["config"] == "exact" else next(
            (r for r in train if r["model"] == "wrn" and r["batch"] == 128 and r["ratio"] < 1 and r["kernels"] == row["kernels"]), None)
        if row.get("step_time_s") and bench:
            agree = row["step_time_s"] / bench["median_s"]
            found.append((f"CLI median step agrees with bench_train ({row['config']}, within 10%)",
                          f"CLI {row['step_time_s'] * 1e3:.1f} ms vs bench {bench['median_s'] * 1e3:.1f} ms", abs(agree - 1) <= 0.10))
    compiled = (results.get("compile_wrn") or {}).get("rows", [])
    text = (work / "compile_wrn.out").read_text(errors="replace") if (work / "compile_wrn.out").exists() else ""
    seconds = [float(line.split("measured in ")[1].split(" s")[0]) for line in text.splitlines()
               if "topk" in line and "measured in " in line]
    found.append(("compile: a sampled WRN compiles (and runs its timed steps) in < 90 s",
                  f"{seconds[0]:.0f} s" if seconds else "not measured", seconds[0] < 90 if seconds else None))
    sampled = best(compiled)
    eager = best(train, model="wrn", batch=128, kernels=sampled["kernels"]) if sampled else None
    found.append(("compile: the compiled sampled WRN is not slower than eager",
                  f"{sampled['median_s'] * 1e3:.1f} ms vs eager {eager['median_s'] * 1e3:.1f} ms" if sampled and eager else "not measured",
                  sampled["median_s"] <= eager["median_s"] if sampled and eager else None))
    return found


stages = []
for line in (work / "stages.tsv").read_text().splitlines():
    name, status, rc, seconds, limit, command = line.split("\t")
    stages.append({"name": name, "status": status, "rc": int(rc), "seconds": int(seconds), "limit_s": int(limit),
                   "command": command, "results": stage_results(name)})
try:  # the checkout's commit, "-dirty" with uncommitted changes; None outside git
    commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True, text=True).stdout.strip() or None
except OSError:
    commit = None
passed = bool(stages) and all(s["status"] == "pass" for s in stages)
measured = goals({s["name"]: s["results"] for s in stages})
report = {"goals": [{"goal": g, "measured": m, "met": met} for g, m, met in measured], "mode": "smoke" if smoke else "full", "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "commit": commit, "budget_s": budget, **json.loads((work / "env.json").read_text()), "passed": passed, "stages": stages}
(out / "gpu_check.json").write_text(json.dumps(report, indent=1))

table = [f"gpu_check ({report['mode']}) {report['date']}, commit {commit}, torch {report['torch']}, device {report['device']}",
         f"{'stage':<18}{'status':<9}{'seconds':>8}{'limit':>7}  command"]
table += [f"{s['name']:<18}{s['status']:<9}{s['seconds']:>8}{s['limit_s']:>7}  {s['command']}" for s in stages]
failed = [s["name"] for s in stages if s["status"] != "pass"]
table.append("RESULT: " + ("PASS" if passed else f"FAIL ({', '.join(failed) or 'no stage ran'})"))
mark = {True: "met", False: "UNMET", None: "not measured"}
summary = [f"goals of issue 18{' (smoke: tiny shapes, not a measurement)' if smoke else ''}:"]
summary += [f"  {mark[met]:<12} {goal}: {value}" for goal, value, met in measured]
host = [r for r in (stage_results("host") or {}).get("rows", []) if r["variant"] != "exact"]
if host:  # not a goal of its own: what each sampled layer call adds to the host's side of a step
    summary.append("host us per layer call (forward + backward), over the untouched layer's: "
                   + ", ".join(f"{r['layer']} {r['variant']} [{r['kernels']}] {r['extra_us']:+.0f}" for r in host))
graphed = (stage_results("graphs") or {}).get("rows", [])
if graphed:  # not a goal either: the step with the host launching nothing (each whole step one CUDA graph)
    summary.append(f"CUDA-graphed steps, {graphed[0]['model']} batch {graphed[0]['batch']}: " + ", ".join(
        f"{r['config']} {r['median_s'] * 1e3:.1f} ms ({r['speedup']:.2f}x)" for r in graphed))
text, log = ["\n".join(summary + [""] + table)], []
for s in stages:
    err = (work / f"{s['name']}.err").read_text(errors="replace")
    text.append(f"\n== {s['name']}: {s['status']} ==\n" + (work / f"{s['name']}.out").read_text(errors="replace"))
    if s["status"] != "pass":
        text.append("-- end of stderr --\n" + "\n".join(err.splitlines()[-40:]))
    log.append(f"== {s['name']}: {s['command']}\n{err}")
(out / "gpu_check.txt").write_text("\n".join(text) + "\n")
(out / "gpu_check.log").write_text("\n".join(log))
print("\n".join(summary + [""] + table))
print(f"results in {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
sys.exit(0 if passed else 1)
PY

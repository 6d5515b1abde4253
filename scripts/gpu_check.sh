#!/usr/bin/env bash
# One command for a CUDA machine: the CUDA tests, the op benchmark, the end-to-end step
# benchmark (eager and torch.compile) and a kernel profile of WRN-28-10 and ResNet-50,
# in at most 6 minutes, with every result under $OUT.
#
#   bash scripts/gpu_check.sh            # the full check; needs CUDA
#   bash scripts/gpu_check.sh --smoke    # every stage, shrunk (CPU: 3-4 min on 2 shared cores)
#   GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh          # the same as --smoke
#   GPU_CHECK_STAGES="train compile_wrn" bash scripts/gpu_check.sh   # only these stages
#
# Needs torch, torchvision and pytest, and hydra-core + omegaconf for the end-to-end stages
# (bench_train.py composes each model's run config: the paper's layer rules live in the model
# YAMLs); never wandb. On a machine without hydra, carry the pure-Python wheels: run
# `bash ../shared/tools/device-prep.sh` here once (it fills .whl/), carry ".whl", and this script
# installs them into a temp dir by itself. The project's tests/conftest.py imports hydra (and the
# CLI) for its fixtures; tests/test_cuda.py uses none of them, so the tests stage runs pytest
# with --noconftest, and without plugins from other packages (PYTEST_DISABLE_PLUGIN_AUTOLOAD:
# hydra-core, where installed, registers one that imports hydra). The checkout goes first on
# PYTHONPATH: no install of the project needed.
#
# Stages, in order of importance; each runs under `timeout`, a failing or timed-out stage does
# not stop the next, and the exit status is non-zero if any stage did not pass. Each stage's
# limit is min(its cap (`caps` below), what is left of GPU_CHECK_BUDGET_S, default 340 s), so
# the whole run ends within 6 minutes whatever happens (SIGKILL 10 s after SIGTERM; report ~1 s).
# Estimated H200 times (from FLOP counts at ~50 % of the 790 TFLOP/s bf16 peak, ~50 TFLOP/s
# for fp32 matmuls without TF32, plus ~8 s of Python/torch/CUDA start-up per process):
#   tests             (est.  15 s) pytest tests/test_cuda.py: 21 tiny cases.
#   ops_bf16          (est.  15 s) scripts/bench_ops.py, bf16, ratios 1.0/0.5/0.25,
#                     conv in channels_last; linear 512x4096->4096 (the CPU benchmark's shape,
#                     51 GFLOP per fwd+bwd) and 8192x4096->4096 (825 GFLOP, ~2 ms); conv2d
#                     64 and 256 x 256->256 3x3 at 32x32 (232 / 927 GFLOP, ~0.6 / 2.4 ms);
#                     10 warm-up + 50 rounds of 4 variants: < 2 s of steps, the rest start-up,
#                     cuDNN autotuning and the profiled steps.
#   ops_fp32          (est.  20 s) the same in fp32 (the big linear ~16 ms a step:
#                     ~3 s of steps).
#   train             (est.  60 s) scripts/bench_train.py, WRN-28-10 (batch 128, 32x32,
#                     4.0 TFLOP a step, ~15 ms) and ResNet-50 (batch 128, 224x224, 3.2 TFLOP,
#                     ~35 ms with its memory-bound BN/ReLU), bf16 autocast + channels_last,
#                     exact vs topk 0.5 and 0.3, eager, rounds for ~3 s per model (~7 s of
#                     steps); cuDNN autotuning of every new conv shape (~10-20 s); then one
#                     profiled step of exact and of topk 0.5 per model.
#   compile_wrn       (est.  85 s) the same with torch.compile (inductor), one
#                     compile per configuration: ~30 s for the first from a cold cache, ~20 s
#                     for the next (shared kernels), 3 warm-up + 20 rounds each.
#   compile_resnet50  (est. 135 s) ResNet-50 likewise (~50 s, then ~35 s each); it
#                     runs last and gets what is left of the budget: if cut, the compile lines
#                     it printed so far are in gpu_check.txt.
#   Sum of the estimates ~330 s; the compile estimates are the least certain.
# --smoke: the same stages and flags, shrunk: linear 8x16->16 and 16x32->32, conv 2x8x6x6 and
# 2x16x6x6, 1 round; the end-to-end stages on the small CNN and MLP (MNIST shapes) at batch 2
# instead of WRN-28-10 and ResNet-50 (36 M and 26 M parameters: seconds a step on a CPU even
# at 8x8 images), 1 warm-up, 1 round; compile with backend aot_eager (traces forward and
# backward, no code generation); on CUDA if there is one, else the CPU (end to end in fp32
# there: CPU bf16 autocast is slow); every stage capped at 300 s.
#
# Results ($OUT, default a new temp dir; 5 files, under the device tool's 8-file limit):
#   gpu_check.json     environment, and per stage: status, exit code, seconds, limit, command,
#                      and its results (pytest counts; the benchmark scripts' JSON)
#   gpu_check.txt      the stage table, then every stage's printed tables (failing stages: the
#                      end of their stderr)
#   gpu_check.log      every stage's stderr in full (warnings, tracebacks)
#   profile_wrn.txt, profile_resnet50.txt   top kernels by self device time of one step of
#                      exact and of topk 0.5 (smoke: profile_cnn.txt, profile_mlp.txt)
#
# Other settings: PYTHON (default python3), GPU_CHECK_BUDGET_S (the run's time budget).
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
    models=(cnn mlp)
    ops_sizes=(--linear "8,16,16" "16,32,32" --conv "2,8,8,3,6" "2,16,16,3,6" --warmup 0 --repeats 1)
    train_sizes=(--batch 2 --warmup 1 --repeats 1 --profile-steps 1)
    compile_sizes=(--batch 2 --warmup 1 --repeats 1 --compile-backend aot_eager)
else
    budget=${GPU_CHECK_BUDGET_S:-340}
    default_cap=60
    caps=([tests]=60 [ops_bf16]=60 [ops_fp32]=75 [train]=120 [compile_wrn]=120 [compile_resnet50]=240)
    models=(wrn resnet50)
    ops_sizes=(--linear "512,4096,4096" "8192,4096,4096" --conv "64,256,256,3,32" "256,256,256,3,32")  # warm-up 10, 50 rounds
    train_sizes=(--batch 128)  # 32x32 (WRN) and 224x224 (ResNet-50); rounds for ~3 s per model
    compile_sizes=(--batch 128 --warmup 3 --repeats 20)
fi
if ! [[ $budget =~ ^[0-9]+$ ]]; then
    echo "gpu_check.sh: GPU_CHECK_BUDGET_S='$budget' is invalid; allowed: a whole number of seconds" >&2
    exit 2
fi
stages=(tests ops_bf16 ops_fp32 train "${models[@]/#/compile_}")
for name in ${GPU_CHECK_STAGES:-}; do
    if [[ " ${stages[*]} " != *" $name "* ]]; then
        echo "gpu_check.sh: GPU_CHECK_STAGES names '$name'; allowed: ${stages[*]}" >&2
        exit 2
    fi
done

work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_work.XXXXXX") || exit 2
trap 'rm -rf "$work"' EXIT
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
# hydra-core/omegaconf for bench_train.py: the carried wheels (device-prep.sh) when not installed
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
elif [[ $smoke == 1 ]]; then
    device=cpu
    amp=off
else
    echo "gpu_check.sh: no CUDA device (torch.cuda.is_available() is False); --smoke runs the shrunk check anywhere" >&2
    exit 2
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
run_stage tests env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PYTHON" -m pytest -q --noconftest -p no:cacheprovider \
    --junitxml="$work/tests.xml" tests/test_cuda.py
for dtype in bf16 fp32; do
    run_stage "ops_$dtype" "$PYTHON" scripts/bench_ops.py --device "$device" --dtype "$dtype" --channels-last \
        --ratios 1.0,0.5,0.25 "${ops_sizes[@]}" --json "$work/ops_$dtype.json"
done
train=(scripts/bench_train.py --device "$device" --amp "$amp" --channels-last on --ratios 0.5 0.3)
run_stage train "$PYTHON" "${train[@]}" --models "${models[@]}" "${train_sizes[@]}" --kernel-profile "$OUT" \
    --json "$work/train.json"
for model in "${models[@]}"; do
    run_stage "compile_$model" "$PYTHON" "${train[@]}" --models "$model" --compile --profile-steps 0 "${compile_sizes[@]}" \
        --json "$work/compile_$model.json"
done

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
report = {"mode": "smoke" if smoke else "full", "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "commit": commit, "budget_s": budget, **json.loads((work / "env.json").read_text()), "passed": passed, "stages": stages}
(out / "gpu_check.json").write_text(json.dumps(report, indent=1))

table = [f"gpu_check ({report['mode']}) {report['date']}, commit {commit}, torch {report['torch']}, device {report['device']}",
         f"{'stage':<18}{'status':<9}{'seconds':>8}{'limit':>7}  command"]
table += [f"{s['name']:<18}{s['status']:<9}{s['seconds']:>8}{s['limit_s']:>7}  {s['command']}" for s in stages]
failed = [s["name"] for s in stages if s["status"] != "pass"]
table.append("RESULT: " + ("PASS" if passed else f"FAIL ({', '.join(failed) or 'no stage ran'})"))
text, log = ["\n".join(table)], []
for s in stages:
    err = (work / f"{s['name']}.err").read_text(errors="replace")
    text.append(f"\n== {s['name']}: {s['status']} ==\n" + (work / f"{s['name']}.out").read_text(errors="replace"))
    if s["status"] != "pass":
        text.append("-- end of stderr --\n" + "\n".join(err.splitlines()[-40:]))
    log.append(f"== {s['name']}: {s['command']}\n{err}")
(out / "gpu_check.txt").write_text("\n".join(text) + "\n")
(out / "gpu_check.log").write_text("\n".join(log))
print("\n".join(table))
print(f"results in {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
sys.exit(0 if passed else 1)
PY

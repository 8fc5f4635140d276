#!/usr/bin/env bash
# The GPU check (issues 4, 8, 13): one call on one H100/H200, at most 8 minutes, no network, no install.
#
#     bash benchmarks/gpu_check.sh                               # all phases, CUDA
#     GPU_CHECK_PHASES="kernels train" bash benchmarks/gpu_check.sh
#     GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 GPU_CHECK_PHASES="kernels train" \
#         GPU_CHECK_RESULTS=/tmp/gc bash benchmarks/gpu_check.sh   # exercise the script on a CPU machine
#
# Phases, each under its own time limit (seconds; override with GPU_CHECK_<PHASE>_S):
#   versions  card, driver, torch/triton/CUDA versions                                     (~10 s)
#   tests     the CUDA subset of the suite: tests/test_gpu.py (when present) and the kernel
#             tests (every test is parametrised over the device; fp32/bf16/fp16 on CUDA;
#             autotuning off so tuning does not dominate)                         TESTS_S=130
#   kernels   `llmcore bench kernels`: flash attention vs SDPA / cuDNN / eager / torch.compile,
#             RoPE and RMSNorm vs eager / torch.compile, bf16, batch 32, heads 8/2, head dim 64,
#             seq 512-4096 (causal and packed), against the copy bandwidth and bf16 matmul peak
#             measured in the same run                                          KERNELS_S=140
#   train     `llmcore bench train`: minimind2-small (then minimind2) at seq 512, MiniMind-style
#             loop vs llmcore eager/sdpa/triton with and without torch.compile, real tokens/s,
#             MFU, peak memory, real-token share padded vs packed                  TRAIN_S=180
#   summary   `llmcore bench targets`: PASS/FAIL per design-card target from this run's results
#             only, written to benchmarks/results/gpu-<card>.{md,json,png}
# The benchmarks run through `python -m llmcore.bench` (the same code as `llmcore bench`, without
# the other command groups' imports). Results of this run go to a fresh folder first, so the summary
# can only see numbers measured now; then they are copied to benchmarks/results/ (GPU_CHECK_RESULTS)
# and, when $OUT is set (the device tool's return folder), there too with the log.
# Works without installing the package: a throw-away folder maps llmcore.kernels to kernels/ and
# llmcore.data_prep to data_prep/ when `import llmcore.kernels` does not already work.
# Exit status: non-zero if a phase failed or ran out of time (targets that FAIL do not change it).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PHASES=${GPU_CHECK_PHASES:-tests kernels train}
RESULTS=${GPU_CHECK_RESULTS:-benchmarks/results}
QUICK=""
[ -n "${GPU_CHECK_QUICK:-}" ] && QUICK="--quick"
TESTS_S=${GPU_CHECK_TESTS_S:-130}
KERNELS_S=${GPU_CHECK_KERNELS_S:-140}
TRAIN_S=${GPU_CHECK_TRAIN_S:-180}
RUN=$(mktemp -d /tmp/gpu_check_run.XXXXXX)
LOG=$(mktemp /tmp/gpu_check.XXXXXX.log)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
[ "$DEVICE" != "cpu" ] && unset TRITON_INTERPRET   # compiled kernels, not the interpreter

started=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - started ))s] $*"; }
declare -A RC=()

phase() {  # phase NAME SECONDS CMD...: run CMD under a hard time limit, record its exit status
    local name=$1 limit=$2; shift 2
    stamp "$name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    RC[$name]=$?
    if [ "${RC[$name]}" -eq 124 ]; then echo "!!! $name ran out of its ${limit}s"; fi
    stamp "$name exit status ${RC[$name]}"
}

main() {
    stamp "card and versions"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi unavailable"
    PYFLAGS=""
    if $PY -P -c "pass" 2>/dev/null; then PYFLAGS="-P"; fi  # -P: ./llmcore does not shadow the mapping below
    if [ -n "${GPU_CHECK_FORCE_SHIM:-}" ] || ! $PY $PYFLAGS -c "import llmcore.kernels, llmcore.data_prep" 2>/dev/null; then
        SHIM=$(mktemp -d /tmp/llmcore_shim.XXXXXX)
        mkdir -p "$SHIM/llmcore"
        cp -r "$ROOT/llmcore/." "$SHIM/llmcore/"
        ln -s "$ROOT/kernels" "$SHIM/llmcore/kernels"
        ln -s "$ROOT/data_prep" "$SHIM/llmcore/data_prep"
        export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
        echo "llmcore mapped through $SHIM (package not installed)"
    fi
    DEVICE="$DEVICE" $PY $PYFLAGS - <<'EOF'
import os, sys, torch
import llmcore.kernels as k
from importlib import metadata
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  triton {metadata.version('triton')}  cuda {torch.version.cuda}")
print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE'}")
print(f"llmcore.kernels from {k.__file__}")
if os.environ["DEVICE"] != "cpu" and not torch.cuda.is_available():
    sys.exit("gpu_check.sh needs a CUDA device (GPU_CHECK_DEVICE=cpu exercises the script on a CPU)")
EOF
    [ $? -eq 0 ] || return 2

    case " $PHASES " in *" tests "*)
        tests="tests/test_kernels_rmsnorm.py tests/test_kernels_rope.py tests/test_kernels_flash_attention.py"
        [ -f tests/test_gpu.py ] && tests="tests/test_gpu.py $tests"
        # shellcheck disable=SC2086
        phase tests "$TESTS_S" env LLMCORE_KERNELS_AUTOTUNE=0 $PY $PYFLAGS -m pytest -q -ra -p no:cacheprovider \
            --durations=10 $tests
    esac
    case " $PHASES " in *" kernels "*)
        # The benchmark stops starting new shapes 25 s before the hard limit, so it still writes its files.
        phase kernels "$KERNELS_S" $PY $PYFLAGS -m llmcore.bench kernels --device "$DEVICE" --out "$RUN" \
            --budget-s $(( KERNELS_S - 25 )) $QUICK
    esac
    case " $PHASES " in *" train "*)
        phase train "$TRAIN_S" $PY $PYFLAGS -m llmcore.bench train --device "$DEVICE" --out "$RUN" \
            --budget-s $(( TRAIN_S - 30 )) $QUICK
    esac

    stamp "summary: design-card targets from this run's results only"
    if ls "$RUN"/*.json >/dev/null 2>&1; then
        mkdir -p "$RESULTS"
        $PY $PYFLAGS -m llmcore.bench targets --results "$RUN" --out "$RESULTS"
        RC[summary]=$?
        cp "$RUN"/* "$RESULTS"/
        for f in "$RUN"/*.md; do echo "--- $(basename "$f") ---"; head -60 "$f"; done
    else
        echo "no results were written in this run"
        RC[summary]=1
    fi
    local bad=0
    for name in "${!RC[@]}"; do
        echo "phase $name: exit ${RC[$name]}"
        [ "${RC[$name]}" -eq 0 ] || bad=1
    done
    stamp "done"
    return $bad
}

main 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp "$RUN"/* "$OUT"/ 2>/dev/null
    cp "$RESULTS"/gpu-* "$OUT"/ 2>/dev/null
    cp "$LOG" "$OUT/gpu_check.log"
fi
exit "$rc"

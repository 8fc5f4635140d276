#!/usr/bin/env bash
# GPU check for the Triton kernels (issue 4). On a CUDA machine, from the repository root:
#
#     bash benchmarks/gpu_check.sh            # tests + full benchmark (seq 512..4096)
#     GPU_CHECK_SEQS="512 2048" bash benchmarks/gpu_check.sh   # shorter benchmark
#     GPU_CHECK_PHASES=tests bash benchmarks/gpu_check.sh      # one phase (tests | bench) per call
#
# Budget: expect a few minutes per phase on an H100/H200 (Triton compiles each kernel variant the
# tests use; the benchmark autotunes the attention kernels and torch.compiles every baseline shape).
#
# 1. prints the card, driver and library versions;
# 2. re-runs the kernel tests on CUDA: every test is parametrised over the device, and on CUDA
#    the dtype parametrisations cover fp32, bf16 and fp16 (fixed tiles, autotuning off, so the
#    run is not dominated by tuning dozens of shapes);
# 3. runs the kernel benchmark (bf16, MiniMind shapes, autotuned kernels), which prints every
#    timing, the measured peaks and PASS/FAIL against the design card's targets, and writes
#    benchmarks/results/kernels_<card>.{csv,md,png}.
# Everything is printed; when $OUT is set (the device tool's return folder) the log and the
# result files are copied there too. Exit status: non-zero if the tests or the benchmark failed.
# Works without installing the package: a throw-away package folder maps llmcore.kernels to
# kernels/ when `import llmcore.kernels` does not already work. No network is needed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
SEQS=${GPU_CHECK_SEQS:-512 1024 2048 4096}
PHASES=${GPU_CHECK_PHASES:-tests bench}
LOG=$(mktemp /tmp/gpu_check.XXXXXX.log)
unset TRITON_INTERPRET          # compiled kernels, not the interpreter
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1

started=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - started ))s] $*"; }

main() {
    stamp "card and versions"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "nvidia-smi unavailable"
    # -P: do not put the current folder first on sys.path, so the mapping below wins over ./llmcore.
    PYFLAGS=""
    if $PY -P -c "pass" 2>/dev/null; then PYFLAGS="-P"; fi
    if [ -n "${GPU_CHECK_FORCE_SHIM:-}" ] || ! $PY $PYFLAGS -c "import llmcore.kernels" 2>/dev/null; then
        SHIM=$(mktemp -d /tmp/llmcore_shim.XXXXXX)
        mkdir -p "$SHIM/llmcore"
        cp -r "$ROOT/llmcore/." "$SHIM/llmcore/"
        ln -s "$ROOT/kernels" "$SHIM/llmcore/kernels"
        [ -d "$ROOT/data_prep" ] && ln -s "$ROOT/data_prep" "$SHIM/llmcore/data_prep"
        export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
        echo "llmcore.kernels mapped through $SHIM (package not installed)"
    fi
    $PY $PYFLAGS - <<'EOF'
import sys, torch, triton
import llmcore.kernels as k
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  triton {triton.__version__}  cuda {torch.version.cuda}")
print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE'}")
print(f"llmcore.kernels from {k.__file__}")
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh needs a CUDA device")
EOF
    [ $? -eq 0 ] || return 2

    tests_rc=0
    bench_rc=0
    case " $PHASES " in *" tests "*)
        stamp "kernel tests on CUDA (fp32, bf16, fp16)"
        LLMCORE_KERNELS_AUTOTUNE=0 $PY $PYFLAGS -m pytest -q -ra -p no:cacheprovider --durations=10 \
            tests/test_kernels_rmsnorm.py tests/test_kernels_rope.py tests/test_kernels_flash_attention.py
        tests_rc=$?
        stamp "kernel tests exit status $tests_rc"
    esac

    case " $PHASES " in *" bench "*)
        stamp "kernel benchmark (bf16, batch 32, heads 8/2, head dim 64, seq $SEQS)"
        # shellcheck disable=SC2086
        $PY $PYFLAGS benchmarks/bench_kernels.py --seqs $SEQS
        bench_rc=$?
        stamp "benchmark exit status $bench_rc"
    esac

    for f in benchmarks/results/kernels_*.md; do
        case "$f" in *cpu_*) ;; *) echo "--- $f ---"; cat "$f" ;; esac
    done
    stamp "done: tests rc=$tests_rc, benchmark rc=$bench_rc"
    [ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
}

main 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    for f in benchmarks/results/kernels_*; do
        case "$f" in *cpu_*) ;; *) cp "$f" "$OUT/" ;; esac
    done
    cp "$LOG" "$OUT/gpu_check.log"
fi
exit "$rc"

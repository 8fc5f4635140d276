#!/usr/bin/env bash
# The GPU check (issues 4, 8, 13, 26, 27): one call on one H100/H200, at most 8.5 minutes of a
# 15-minute device allowance (the machine's start and a short rerun must fit too), no network, no install. It returns results whatever happens
# to one part, and always ends with a summary of what was and was not measured.
#
#     bash benchmarks/gpu_check.sh                        # all phases, CUDA
#     bash benchmarks/gpu_check.sh --stage-data           # copy the sample data it needs into .cache/shared-data
#     GPU_CHECK_PHASES="kernels train" bash benchmarks/gpu_check.sh
#     GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh   # rehearse the script on a CPU
#
# Phases, in this order, each under its own time limit (seconds; GPU_CHECK_<PHASE>_S overrides,
# e.g. GPU_CHECK_KERNEL_TESTS_S), every limit cut to what the overall deadline leaves:
#   versions      card, driver, versions; imports every benchmark needs (torch, triton, typer, numpy,
#                 pyarrow, tokenizers, safetensors, matplotlib, pytest, llmcore.*) and finds the
#                 sample data; says plainly what is missing and which phases that skips
#   kernel-tests  CUDA correctness of the Triton kernels (tests/test_kernels_*.py, fp32/bf16/fp16,
#                 autotuning off)                                                     60
#   kernels       `llmcore bench kernels`: flash attention vs SDPA/cuDNN/eager/compile, RoPE and
#                 RMSNorm vs eager/compile, bf16, seq 512-4096, against measured peaks  90
#   train         `llmcore bench train`: minimind2-small (targets) then minimind-3 (head dim 96,
#                 QK-norm) at seq 512, MiniMind-style loop vs llmcore loops           120
#   recipe        `llmcore bench recipe`: minimind-3, MiniMind's AdamW + cosine vs Muon + WSD, 2 seeds,
#                 4 epochs of the CMRC2018 rows at batch 16 x 512 (stopped: the seeds that finished) 70
#   scale         `llmcore bench scale`: 5 sizes of the minimind-3 family (192x4 .. 768x8, 31x in
#                 non-embedding parameters), 6 epochs of the same rows; --budget-minutes skips the
#                 largest sizes that would not fit (named)                           80
#   train-tests   tests/test_gpu.py (training runs on CUDA): whatever time is left      45
#   summary       PASS/FAIL per design-card target from this run's results only, what failed, what
#                 was cut short, what was skipped; written to benchmarks/results/gpu-<card>.{md,json,png}
#
# Time: one deadline, GPU_CHECK_TOTAL_S (510) from the start, of which GPU_CHECK_SUMMARY_S (30) is
# kept for the summary. A phase gets min(its limit, time left - summary reserve - grace) and is
# skipped (and named) when that is under GPU_CHECK_MIN_PHASE_S (20). At its limit a benchmark gets
# SIGTERM and writes what it measured so far (marked interrupted; a loop or shape that raises is
# recorded as failed and the others go on); pytest gets SIGINT and prints what ran; after
# GPU_CHECK_GRACE_S (10) more, SIGKILL. The benchmarks' own --budget-s ends 30 s before the limit.
# Autotuning: results and compiled kernels persist in .cache/gpu_check/ (TRITON_CACHE_AUTOTUNING),
# so a rerun on the same machine pays neither; GPU_CHECK_AUTOTUNE=0 turns autotuning off.
#
# Sample data (bench train): $LLMCORE_SHARED_DATA, else ../shared/data beside the checkout, else
# shared/data inside it, else .cache/shared-data. The device machine gets only the checkout, so
# run `--stage-data` first and pass `.cache/shared-data` in the device tool's `carry`.
# Works without installing the package: when `import llmcore` is not this checkout's, a throw-away
# folder of symlinks maps llmcore, llmcore.kernels (kernels/) and llmcore.data_prep (data_prep/).
#
# Results of this run go to a fresh folder first, so the summary can only see numbers measured
# now; then they are copied to benchmarks/results/ (GPU_CHECK_RESULTS) and, when $OUT is set (the
# device tool's return folder), to $OUT as gpu_check.log, gpu_check_summary.md and
# gpu_check_results.tar.gz (every file of the run, per-phase logs included).
# Exit status: 0 when every phase ran to the end without a failure; 1 otherwise (targets that FAIL
# do not change it; the summary says what happened).
#
# Rehearsal knobs (tests/test_gpu_check.py): GPU_CHECK_KERNEL_TESTS / GPU_CHECK_TRAIN_TESTS (pytest
# arguments), GPU_CHECK_KERNELS_ARGS / GPU_CHECK_TRAIN_ARGS / GPU_CHECK_RECIPE_ARGS / GPU_CHECK_SCALE_ARGS
# (bench flags; the recipe's and scale's replace the GPU sizing above, which --quick leaves out), GPU_CHECK_FORCE_SHIM,
# and LLMCORE_BENCH_FAULT="raise:TEXT" / "hang:TEXT" (a loop or measurement that fails or hangs).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

find_data() {  # the first folder that holds the sample data bench train needs, or nothing
    local d
    for d in ${LLMCORE_SHARED_DATA:+"$LLMCORE_SHARED_DATA"} "$ROOT/../shared/data" "$ROOT/shared/data" \
             "$ROOT/.cache/shared-data"; do
        if [ -f "$d/minimind_tokenizer/tokenizer.json" ] && [ -f "$d/rag/cmrc2018_dev_docs.jsonl" ]; then
            (cd "$d" && pwd); return 0
        fi
    done
    return 1
}

if [ "${1:-}" = "--stage-data" ]; then
    src=$(find_data) || { echo "error: no sample data found (set LLMCORE_SHARED_DATA to the shared data folder)" >&2; exit 2; }
    dst="$ROOT/.cache/shared-data"
    if [ "$src" != "$dst" ]; then
        mkdir -p "$dst/rag"
        cp -r "$src/minimind_tokenizer" "$dst/"
        cp "$src/rag/cmrc2018_dev_docs.jsonl" "$dst/rag/"
        [ -f "$src/pretrain_sample.jsonl" ] && cp "$src/pretrain_sample.jsonl" "$dst/"
    fi
    echo "staged $(du -sh "$dst" | cut -f1) of sample data in .cache/shared-data (git-ignored);"
    echo "pass carry=[\".cache/shared-data\"] to the device tool so the train phase finds it there"
    exit 0
fi

PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PHASES=${GPU_CHECK_PHASES:-kernel-tests kernels train recipe scale train-tests}
RESULTS=${GPU_CHECK_RESULTS:-benchmarks/results}
TOTAL_S=${GPU_CHECK_TOTAL_S:-510}
RESERVE_S=${GPU_CHECK_SUMMARY_S:-30}
GRACE_S=${GPU_CHECK_GRACE_S:-10}
MIN_PHASE_S=${GPU_CHECK_MIN_PHASE_S:-20}
QUICK=""
[ -n "${GPU_CHECK_QUICK:-}" ] && QUICK="--quick"
# The GPU sizing of the recipe and scale phases (see the header); a --quick rehearsal uses the toy defaults.
RECIPE_ARGS=${GPU_CHECK_RECIPE_ARGS-$([ -z "$QUICK" ] && echo "--seeds 2 --batch 16")}
SCALE_ARGS=${GPU_CHECK_SCALE_ARGS-$([ -z "$QUICK" ] && echo "--epochs 6")}
KERNEL_TESTS=${GPU_CHECK_KERNEL_TESTS:-tests/test_kernels_rmsnorm.py tests/test_kernels_rope.py tests/test_kernels_flash_attention.py}
TRAIN_TESTS=${GPU_CHECK_TRAIN_TESTS:-tests/test_gpu.py}
started=$(date +%s)
DEADLINE=$(( started + TOTAL_S ))
RUN=$(mktemp -d /tmp/gpu_check_run.XXXXXX)
LOG="$RUN/gpu_check.log"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
[ "$DEVICE" != "cpu" ] && unset TRITON_INTERPRET   # compiled kernels, not the interpreter
mkdir -p "$ROOT/.cache/gpu_check"
export TRITON_CACHE_DIR="$ROOT/.cache/gpu_check/triton" TORCHINDUCTOR_CACHE_DIR="$ROOT/.cache/gpu_check/inductor"
export TRITON_CACHE_AUTOTUNING=1
[ "${GPU_CHECK_AUTOTUNE:-1}" = "0" ] && export LLMCORE_KERNELS_AUTOTUNE=0

stamp() { echo "=== [$(( $(date +%s) - started ))s] $*"; }
ORDER=()
declare -A STATUS=() SECS=()

record() {  # record NAME STATUS SECONDS
    ORDER+=("$1"); STATUS[$1]=$2; SECS[$1]=$3
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$RUN/phases.tsv"
}

LIMIT=0
plan() {  # plan NAME DEFAULT_LIMIT: sets LIMIT, or records the phase as skipped and returns 1
    local name=$1 limit=$2 var left
    var="GPU_CHECK_$(echo "$name" | tr 'a-z-' 'A-Z_')_S"
    limit=${!var:-$limit}
    left=$(( DEADLINE - $(date +%s) - RESERVE_S - GRACE_S ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt "$MIN_PHASE_S" ]; then
        echo "!!! $name skipped: ${limit}s for it (${left}s left before the summary's reserve), under the ${MIN_PHASE_S}s minimum"
        record "$name" "SKIPPED (no time left: ${limit}s, under ${MIN_PHASE_S}s)" 0
        return 1
    fi
    LIMIT=$limit
}

run_phase() {  # run_phase NAME SIGNAL CMD...: run CMD under LIMIT, its output also in $RUN/NAME.log
    local name=$1 sig=$2 t0 rc status
    shift 2
    stamp "$name (limit ${LIMIT}s): $*"
    t0=$(date +%s)
    timeout --signal="$sig" --kill-after="$GRACE_S" "$LIMIT" "$@" 2>&1 | tee "$RUN/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status="ok" ;;
        124) status="STOPPED at its ${LIMIT}s limit (what it measured is kept)" ;;
        137) status="KILLED after its ${LIMIT}s limit + ${GRACE_S}s grace" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    local bench_json
    bench_json=$(ls -t "$RUN/$name"-*.json 2>/dev/null | head -n 1)
    if [ -n "$bench_json" ]; then  # parts of a benchmark that failed while the others went on
        local nfail
        nfail=$(grep -c '^ *"error": ' "$bench_json")  # only a failure entry has an "error" key
        [ "$nfail" -gt 0 ] && status="$status, $nfail part(s) FAILED (see the summary)"
        [ "$rc" -eq 137 ] && status="$status, partial results written before the kill"
    elif [ "$name" != "${name%tests}" ] || [ "$name" = "versions" ]; then
        :
    else
        status="$status, no results written"
    fi
    if [ "$name" != "${name%tests}" ]; then  # pytest's own count of what ran
        local counts
        counts=$(grep -Eo '[0-9]+ (passed|failed|errors?|skipped|deselected)' "$RUN/$name.log" | tail -n 6 | paste -sd ' ' -)
        [ -n "$counts" ] && status="$status: $counts"
    fi
    record "$name" "$status" $(( $(date +%s) - t0 ))
    stamp "$name: $status"
}

budget() {  # seconds a benchmark may plan for: its limit less a margin for one more shape or loop and the files
    local b=$(( LIMIT - 30 ))
    [ "$b" -lt $(( LIMIT / 2 )) ] && b=$(( LIMIT / 2 ))
    echo "$b"
}

budget_minutes() {  # budget() in minutes, for benchmarks whose bound is --budget-minutes
    awk -v s="$(budget)" 'BEGIN { printf "%.2f", s / 60 }'
}

versions() {
    stamp "versions: card, versions, imports, sample data"
    local t0 rc missing=0
    t0=$(date +%s)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi unavailable"
    PYFLAGS=""
    if $PY -P -c "pass" 2>/dev/null; then PYFLAGS="-P"; fi  # -P: ./llmcore does not shadow the mapping below
    local here
    here=$($PY $PYFLAGS -c "import os, llmcore, llmcore.kernels, llmcore.data_prep; print(os.path.realpath(llmcore.__file__))" 2>/dev/null)
    if [ -n "${GPU_CHECK_FORCE_SHIM:-}" ] || [ "$here" != "$ROOT/llmcore/__init__.py" ]; then
        # Symlinks, not copies: modules resolve their own path to this checkout (bench/corpus.py finds
        # the sample data from there), and nothing is written into the checkout.
        SHIM=$(mktemp -d /tmp/llmcore_shim.XXXXXX)
        mkdir -p "$SHIM/llmcore"
        local entry
        for entry in "$ROOT"/llmcore/*; do
            [ "$(basename "$entry")" = "__pycache__" ] || ln -s "$entry" "$SHIM/llmcore/$(basename "$entry")"
        done
        ln -s "$ROOT/kernels" "$SHIM/llmcore/kernels"
        ln -s "$ROOT/data_prep" "$SHIM/llmcore/data_prep"
        export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
        echo "llmcore mapped through $SHIM to $ROOT (${here:+installed copy at $here is not this checkout; }package not installed from here)"
    fi
    DATA=$(find_data) && export LLMCORE_SHARED_DATA="$DATA"
    DEVICE="$DEVICE" DATA="${DATA:-}" $PY $PYFLAGS - <<'EOF'
import importlib, os, sys
need = {  # module: what needs it
    "torch": "everything", "triton": "the kernels", "numpy": "data, benchmarks", "typer": "python -m llmcore.bench",
    "pyarrow": "shards (bench train)", "tokenizers": "MiniMind's tokenizer (bench train)",
    "safetensors": "checkpoints (tests)", "matplotlib": "result plots (png)", "pytest": "the test phases",
    "llmcore.kernels": "the kernels", "llmcore.data_prep": "shards (bench train)",
    "llmcore.bench.kernels": "bench kernels", "llmcore.bench.train": "bench train", "llmcore.train": "training",
}
missing = []
for mod, why in need.items():
    try:
        m = importlib.import_module(mod)
        ver = getattr(m, "__version__", "")
        print(f"  ok       {mod:24s} {ver:14s} {os.path.dirname(getattr(m, '__file__', '') or '')}")
    except Exception as err:  # any import failure is reported, never a traceback
        missing.append(mod)
        print(f"  MISSING  {mod:24s} needed by {why}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
with open(os.path.join(os.environ["RUN_DIR"], "missing.txt"), "w") as f:
    f.write(" ".join(missing))
if "torch" in missing:
    sys.exit("torch does not import: no phase can run")
import torch
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  cuda {torch.version.cuda}  "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE'}")
data = os.environ["DATA"]
print(f"sample data: {data}" if data else "sample data: MISSING (needs minimind_tokenizer/ and rag/cmrc2018_dev_docs.jsonl; "
      "run `bash benchmarks/gpu_check.sh --stage-data` and carry .cache/shared-data): the train phase is skipped")
if os.environ["DEVICE"] != "cpu" and not torch.cuda.is_available():
    sys.exit("gpu_check.sh needs a CUDA device (GPU_CHECK_DEVICE=cpu rehearses the script on a CPU)")
EOF
    rc=$?
    MISSING=$(cat "$RUN/missing.txt" 2>/dev/null)
    if [ "$rc" -ne 0 ]; then
        record versions "FAILED (exit $rc): no usable torch or device; no phase can run" $(( $(date +%s) - t0 ))
        return 1
    fi
    record versions "ok${MISSING:+, missing: $MISSING}" $(( $(date +%s) - t0 ))
}

needs() {  # needs PHASE MODULE...: false (and the phase recorded as skipped) when a module is missing
    local phase=$1 m
    shift
    for m in "$@"; do
        case " $MISSING " in *" $m "*)
            echo "!!! $phase skipped: $m is missing"
            record "$phase" "SKIPPED ($m missing)" 0
            return 1
        esac
    done
}

summary() {
    stamp "summary: what was and was not measured (this run's results only)"
    local t0 f
    t0=$(date +%s)
    if ls "$RUN"/*-*-*.json >/dev/null 2>&1 && [ -z "$(echo " $MISSING " | grep -E ' (torch|typer|matplotlib|numpy) ')" ]; then
        mkdir -p "$RESULTS"
        timeout --kill-after=5 $(( RESERVE_S - 8 > 10 ? RESERVE_S - 8 : 10 )) \
            $PY $PYFLAGS -m llmcore.bench targets --results "$RUN" --out "$RUN/summary" --phases "$RUN/phases.tsv"
        rc=$?
        [ "$rc" -eq 0 ] || echo "!!! the targets summary failed (exit $rc); phase table below"
        for f in "$RUN"/*-*-*.json "$RUN"/*-*-*.md "$RUN"/*-*-*.png; do
            [ -f "$f" ] && cp "$f" "$RESULTS"/
        done
    else
        echo "no benchmark results were written in this run: nothing was measured"
    fi
    echo
    echo "phase          seconds  status"
    local name bad=0
    for name in "${ORDER[@]}"; do
        printf '%-14s %7s  %s\n' "$name" "${SECS[$name]}" "${STATUS[$name]}"
        case "${STATUS[$name]}" in ok|"ok, "*|"ok: "*) ;; *) bad=1 ;; esac
        case "${STATUS[$name]}" in *" failed"*|*" error"*) bad=1 ;; esac
    done
    for f in "$RUN"/*-*-*.json; do
        [ -f "$f" ] && grep -q '^ *"error": ' "$f" && bad=1  # a loop or shape that failed
    done
    stamp "done in $(( $(date +%s) - started ))s (deadline ${TOTAL_S}s)"
    return $bad
}

main() {
    local rc=0
    export RUN_DIR="$RUN"
    : > "$RUN/phases.tsv"
    MISSING=""
    if versions; then
        case " $PHASES " in *" kernel-tests "*)
            if needs kernel-tests pytest triton llmcore.kernels && plan kernel-tests 60; then
                # shellcheck disable=SC2086
                run_phase kernel-tests INT env LLMCORE_KERNELS_AUTOTUNE=0 $PY $PYFLAGS -m pytest -q -ra \
                    -p no:cacheprovider --durations=10 --junitxml="$RUN/kernel-tests.xml" $KERNEL_TESTS
            fi
        esac
        case " $PHASES " in *" kernels "*)
            if needs kernels typer triton llmcore.bench.kernels && plan kernels 90; then
                # shellcheck disable=SC2086
                run_phase kernels TERM $PY $PYFLAGS -m llmcore.bench kernels --device "$DEVICE" --out "$RUN" \
                    --budget-s "$(budget)" $QUICK ${GPU_CHECK_KERNELS_ARGS:-}
            fi
        esac
        case " $PHASES " in *" train "*)
            if [ -z "${DATA:-}" ]; then
                echo "!!! train skipped: no sample data (see the versions phase)"
                record train "SKIPPED (no sample data: run --stage-data and carry .cache/shared-data)" 0
            elif needs train typer pyarrow tokenizers llmcore.bench.train && plan train 120; then
                # shellcheck disable=SC2086
                run_phase train TERM $PY $PYFLAGS -m llmcore.bench train --device "$DEVICE" --out "$RUN" \
                    --budget-s "$(budget)" --data-dir "$DATA" $QUICK ${GPU_CHECK_TRAIN_ARGS:-}
            fi
        esac
        case " $PHASES " in *" recipe "*)
            if [ -z "${DATA:-}" ]; then
                echo "!!! recipe skipped: no sample data (see the versions phase)"
                record recipe "SKIPPED (no sample data: run --stage-data and carry .cache/shared-data)" 0
            elif needs recipe typer pyarrow tokenizers llmcore.train && plan recipe 70; then
                # shellcheck disable=SC2086
                run_phase recipe TERM $PY $PYFLAGS -m llmcore.bench recipe --device "$DEVICE" --out "$RUN" \
                    --data-dir "$DATA" $QUICK $RECIPE_ARGS
            fi
        esac
        case " $PHASES " in *" scale "*)
            if [ -z "${DATA:-}" ]; then
                echo "!!! scale skipped: no sample data (see the versions phase)"
                record scale "SKIPPED (no sample data: run --stage-data and carry .cache/shared-data)" 0
            elif needs scale typer pyarrow tokenizers llmcore.train && plan scale 80; then
                # shellcheck disable=SC2086
                run_phase scale TERM $PY $PYFLAGS -m llmcore.bench scale --device "$DEVICE" --out "$RUN" \
                    --data-dir "$DATA" --budget-minutes "$(budget_minutes)" $QUICK $SCALE_ARGS
            fi
        esac
        case " $PHASES " in *" train-tests "*)
            if needs train-tests pytest llmcore.train && plan train-tests 45; then
                # shellcheck disable=SC2086
                run_phase train-tests INT $PY $PYFLAGS -m pytest -q -ra -p no:cacheprovider --durations=10 \
                    --junitxml="$RUN/train-tests.xml" $TRAIN_TESTS
            fi
        esac
    else
        local name
        for name in $PHASES; do record "$name" "SKIPPED (the versions phase failed)" 0; done
    fi
    summary || rc=1
    return $rc
}

main 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
card=$(ls "$RUN"/summary/gpu-*.md 2>/dev/null | head -n 1)
[ -n "$card" ] && mkdir -p "$RESULTS" && cp "$RUN"/summary/gpu-* "$RESULTS"/ 2>/dev/null
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp "$LOG" "$OUT/gpu_check.log"
    [ -n "$card" ] && cp "$card" "$OUT/gpu_check_summary.md"
    tar -czf "$OUT/gpu_check_results.tar.gz" -C "$RUN" . 2>/dev/null
fi
echo "results of this run: $RUN (copied to $RESULTS)"
exit "$rc"

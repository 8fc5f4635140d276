"""`llmcore bench kernels`: our Triton RMSNorm, RoPE, fused QK-norm + RoPE and flash attention against
eager PyTorch, torch.compile and SDPA (default dispatch and cuDNN), forward and backward, at MiniMind shapes.

On CUDA (bf16; batch 32, 8 query / 2 KV heads, head dim 64, seq 512-4096, hidden 512/768; QK-norm +
RoPE and one causal attention case at MiniMind-3's 8 / 4 heads of head dim 96) every
implementation is timed with `triton.testing.do_bench` (median of one call's repeats) in
`repeats` interleaved rounds; the report gives the median over rounds with its spread, GB/s
(RMSNorm, RoPE: the minimal bytes the op must move) or TFLOP/s (attention: causal matmul FLOPs,
backward = 2.5x forward) against peaks measured on the same card in the same run (a large
device-to-device copy; a large bf16 matmul), every ratio against the baselines, and the design
card's targets (PASS/FAIL).

On CPU the kernels run only in Triton's interpreter, whose timings say nothing about a GPU, so
the command runs a correctness sweep instead (Triton vs the fp32 reference, outputs and
gradients) and says so. `dry_run_timing=True` runs the CUDA timing code on CPU at toy shapes with
eager stand-ins for torch.compile (to test this module without a GPU; the numbers are labelled
meaningless).

Invariants: a timing that ran out of memory is recorded as not measured (never as a number); a
target whose inputs were not measured is NOT MEASURED, never PASS.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from llmcore import reference
from llmcore.bench.harness import BenchResult, summarize
from llmcore.bench.report import fmt
from llmcore.errors import LLMCoreError

log = logging.getLogger(__name__)

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64
# MiniMind-3 (Qwen3-style): QK-norm, 4 KV heads, head dim 96 (flash attention pads its tiles to 128).
M3_HEADS, M3_KV_HEADS, M3_HEAD_DIM = 8, 4, 96
ATTN_BWD_FACTOR = 2.5  # backward FLOPs of attention relative to forward (FlashAttention-2 count)


def _import_kernels(device: torch.device) -> Any:
    """`llmcore.kernels`, in the interpreter on CPU (TRITON_INTERPRET must precede triton's import)."""
    if device.type != "cuda":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise LLMCoreError(
                "bench kernels --device cpu needs Triton's interpreter, but triton was already "
                "imported without TRITON_INTERPRET=1; run it in a fresh process"
            )
        os.environ["TRITON_INTERPRET"] = "1"
    import llmcore.kernels as K

    return K


# ------------------------------------------------------------------------------------------------
# baselines


def eager_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF Llama-style RoPE in the input dtype (tables sliced and cast per call)."""
    seq = q.shape[1]
    c = cos[:seq].to(q.dtype)[None, :, None, :]
    s = sin[:seq].to(q.dtype)[None, :, None, :]

    def rot(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * c + rot(q) * s, k * c + rot(k) * s


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Materialised causal GQA attention in the input dtype, softmax in fp32 (a typical eager model)."""
    batch, seq, heads, head_dim = q.shape
    rep = heads // k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.repeat_interleave(rep, dim=2).transpose(1, 2)
    vt = v.repeat_interleave(rep, dim=2).transpose(1, 2)
    scores = (qt @ kt.transpose(-1, -2)) * (1.0 / math.sqrt(head_dim))
    mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return (probs @ vt).transpose(1, 2)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's fused attention, causal (or with a boolean mask), GQA without copies when supported."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kw: dict[str, Any] = {"attn_mask": mask} if mask is not None else {"is_causal": True}
    try:
        out = F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True, **kw)
    except (TypeError, RuntimeError):  # a backend without GQA: repeat K/V
        rep = q.shape[2] // k.shape[2]
        out = F.scaled_dot_product_attention(qt, kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1), **kw)
    return out.transpose(1, 2)


def sdpa_backend(name: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Wrap a call so SDPA may use only the named backend (`cudnn`, `flash`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[name]

    def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with sdpa_kernel([backend]):
                return fn()

        return call

    return wrap


# ------------------------------------------------------------------------------------------------
# timing


def _bench_ms(
    fn: Callable[[], Any], device: torch.device, grad_to_none: list[torch.Tensor] | None = None, rep_ms: int = 40
) -> float:
    if device.type != "cuda":  # dry run: one wall-clock call, only to exercise the code
        for t in grad_to_none or []:
            t.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_peaks(device: torch.device, rounds: int) -> dict[str, list[float]]:
    """Copy bandwidth (GB/s, read + write) and dense bf16 matmul throughput (TFLOP/s) of this card."""
    cuda = device.type == "cuda"
    n = 1 << 30 if cuda else 1 << 22  # bytes each way: 1 GiB is far beyond L2, so this is HBM bandwidth
    src = torch.empty(n // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    m = 8192 if cuda else 128
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    copy, mm = [], []
    for _ in range(rounds):
        copy.append(2 * n / (_bench_ms(lambda: dst.copy_(src), device) * 1e-3) / 1e9)
        mm.append(2 * m**3 / (_bench_ms(lambda: a @ b, device) * 1e-3) / 1e12)
    del src, dst, a, b
    _empty_cache(device)
    return {"copy_gbs": copy, "matmul_tflops": mm}


def _directions(fn: Callable[[], Any], grads: tuple[torch.Tensor, ...]) -> dict[str, Callable[[], Any]]:
    """fwd, bwd (backward of one recorded forward, graph retained) and fwd+bwd."""

    def fwd_bwd() -> None:
        out = fn()
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads)

    out = fn()
    outs = out if isinstance(out, tuple) else (out,)

    def bwd() -> None:
        torch.autograd.backward(outs, grads, retain_graph=True)

    return {"fwd": fn, "bwd": bwd, "fwd+bwd": fwd_bwd}


def time_impls(
    impls: dict[str, Callable[[], Any]],
    inputs: list[torch.Tensor],
    grads: tuple[torch.Tensor, ...],
    device: torch.device,
    rounds: int,
    notes: list[str],
) -> dict[tuple[str, str], list[float]]:
    """ms per call for every (impl, direction), `rounds` interleaved rounds; OOM leaves the pair out."""
    calls: dict[tuple[str, str], Callable[[], Any]] = {}
    for impl, fn in impls.items():
        try:
            for direction, call in _directions(fn, grads).items():
                call()  # compile / autotune / first-call costs stay outside the timings
                calls[(impl, direction)] = call
        except torch.cuda.OutOfMemoryError:
            notes.append(f"{impl}: out of memory, not measured")
            _empty_cache(device)
        except Exception as err:  # e.g. an SDPA backend or a kernel that refuses these inputs: the others go on
            notes.append(f"{impl}: not measured ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]})")
        for t in inputs:
            t.grad = None
    times: dict[tuple[str, str], list[float]] = {k: [] for k in calls}
    keys = list(calls)
    for r in range(rounds):
        for key in keys[r % max(len(keys), 1) :] + keys[: r % max(len(keys), 1)]:
            try:
                times[key].append(_bench_ms(calls[key], device, grad_to_none=inputs))
            except torch.cuda.OutOfMemoryError:
                _empty_cache(device)
            except Exception as err:  # a call that ran once and then fails: recorded, the others go on
                notes.append(f"{key[0]} {key[1]}: failed while timed ({type(err).__name__})")
    for t in inputs:
        t.grad = None
    calls.clear()
    _empty_cache(device)
    return {k: v for k, v in times.items() if v}


# ------------------------------------------------------------------------------------------------
# GPU timing run


def run_timing(
    res: BenchResult,
    device: torch.device,
    batch: int,
    seqs: list[int],
    hiddens: list[int],
    rounds: int,
    K: Any,
    dry_run: bool,
    budget_s: float | None = None,
) -> None:
    cuda = device.type == "cuda"
    t_start = time.perf_counter()

    def over_budget(what: str) -> bool:
        """True (and noted) when the time budget is spent: the shape is skipped, not estimated."""
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            res.note(f"{what}: skipped (time budget {budget_s:.0f}s spent)")
            return True
        return False

    dt = torch.bfloat16 if cuda else torch.float32
    torch._dynamo.config.cache_size_limit = 256  # one static graph per shape is the point
    peaks = measure_peaks(device, rounds)
    copy = res.measure(
        "peak: device copy", "bandwidth", "GB/s", peaks["copy_gbs"], shape="1 GiB bf16 copy" if cuda else "toy"
    )
    mm = res.measure(
        "peak: bf16 matmul", "throughput", "TFLOP/s", peaks["matmul_tflops"], shape="8192^3" if cuda else "toy"
    )
    copy_peak, mm_peak = copy["median"], mm["median"]
    log.info("measured peaks: copy %.0f GB/s, bf16 matmul %.1f TFLOP/s", copy_peak, mm_peak)
    if cuda and not dry_run:
        comp_norm = torch.compile(K.rms_norm_reference, dynamic=False)
        comp_rope = torch.compile(eager_rope, dynamic=False)
        comp_attn = torch.compile(eager_attention, dynamic=False)
        comp_qk = torch.compile(K.qk_norm_rope_reference, dynamic=False)
    else:  # dry run: no C++ toolchain assumed; eager functions stand in for compiled ones
        comp_norm, comp_rope, comp_attn = K.rms_norm_reference, eager_rope, eager_attention
        comp_qk = K.qk_norm_rope_reference
        res.note("dry run: `compile` is the eager function (no torch.compile on CPU here); numbers are meaningless")
    notes: list[str] = []

    def record(
        op: str,
        shape: str,
        seq: int,
        times: dict[tuple[str, str], list[float]],
        metric: str,
        amount: dict[str, float],
        peak: float,
    ) -> None:
        scale = 1e9 if metric == "GB/s" else 1e12
        for (impl, direction), ms in sorted(times.items()):
            values = [amount[direction] / (t * 1e-3) / scale for t in ms]
            res.measure(
                f"{op} {shape} {direction} {impl}",
                "bandwidth" if metric == "GB/s" else "throughput",
                metric,
                values,
                op=op,
                shape=shape,
                seq=seq,
                direction=direction,
                impl=impl,
                ms=summarize(ms),
                peak_fraction=statistics_median(values) / peak if peak else None,
            )
        for direction in ("fwd", "bwd", "fwd+bwd"):
            for base in ("eager", "compile", "sdpa", "sdpa-cudnn"):
                if (base, direction) in times and ("triton", direction) in times:
                    res.ratio(
                        f"{op} {shape} {direction}: triton vs {base}",
                        f"{op} {shape} {direction} triton",
                        f"{op} {shape} {direction} {base}",
                        what="speed (higher: triton faster)",
                    )

    # Every op at the first sequence length before any op at the next, so a time budget that runs out
    # still leaves each target measured at MiniMind's own length (512).
    cos, sin = K.rope_tables(HEAD_DIM, max(seqs), device=device)
    for seq in seqs:
        for packed in (False, True):
            if over_budget(f"attention T{seq} {'packed' if packed else 'causal'}"):
                continue
            _attention(res, K, device, dt, batch, seq, packed, rounds, notes, comp_attn, record, cuda)
        if seq == seqs[0] and not over_budget(f"attention T{seq} D{M3_HEAD_DIM}"):
            # MiniMind-3's head dim (not a power of two) at the first length only: the padded-tile path.
            _attention(
                res,
                K,
                device,
                dt,
                batch,
                seq,
                False,
                rounds,
                notes,
                comp_attn,
                record,
                cuda,
                heads=(M3_HEADS, M3_KV_HEADS, M3_HEAD_DIM),
            )

        if not over_budget(f"rope T{seq}"):
            q = torch.randn(batch, seq, HEADS, HEAD_DIM, device=device, dtype=dt, requires_grad=True)
            k = torch.randn(batch, seq, KV_HEADS, HEAD_DIM, device=device, dtype=dt, requires_grad=True)
            gq, gk = torch.randn_like(q), torch.randn_like(k)
            impls = {
                "triton": lambda: K.apply_rope(q, k, cos, sin),
                "eager": lambda: eager_rope(q, k, cos, sin),
                "compile": lambda: comp_rope(q, k, cos, sin),
            }
            times = time_impls(impls, [q, k], (gq, gk), device, rounds, notes)
            elem = (q.numel() + k.numel()) * q.element_size()
            record(
                "rope",
                f"B{batch} T{seq} H{HEADS}/{KV_HEADS} D{HEAD_DIM}",
                seq,
                times,
                "GB/s",
                {"fwd": 2 * elem, "bwd": 2 * elem, "fwd+bwd": 4 * elem},
                copy_peak,
            )
            del q, k, gq, gk
            log.info("rope T%d done", seq)

        if not over_budget(f"qk_norm_rope T{seq}"):
            _qk_norm_rope(K, device, dt, batch, seq, rounds, notes, comp_qk, record, copy_peak)

        for hidden in hiddens:
            if over_budget(f"rmsnorm h{hidden} T{seq}"):
                continue
            x = torch.randn(batch, seq, hidden, device=device, dtype=dt, requires_grad=True)
            w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dt).requires_grad_(True)
            g = torch.randn_like(x)
            impls = {
                "triton": lambda: K.rms_norm(x, w, 1e-5),
                "eager": lambda: K.rms_norm_reference(x, w, 1e-5),
                "compile": lambda: comp_norm(x, w, 1e-5),
            }
            times = time_impls(impls, [x, w], (g,), device, rounds, notes)
            elem = x.numel() * x.element_size()
            # Minimal traffic: fwd reads x, writes y; bwd reads x and dy, writes dx (weight, rstd negligible).
            record(
                "rmsnorm",
                f"B{batch} T{seq} h{hidden}",
                seq,
                times,
                "GB/s",
                {"fwd": 2 * elem, "bwd": 3 * elem, "fwd+bwd": 5 * elem},
                copy_peak,
            )
            del x, w, g
            log.info("rmsnorm h%d T%d done", hidden, seq)

    for n in dict.fromkeys(notes):
        res.note(n)
    res.note(
        "packed attention: SDPA gets the block-diagonal causal mask as a boolean attn_mask (its fused "
        "flash backend takes no document offsets), ours gets per-token document bounds computed once "
        "outside the timing (as the model does once per forward); the packed FLOP count assumes "
        "full causal rows, so its TFLOP/s overstates the work of both equally."
    )
    if batch * HEADS * max(seqs) ** 2 * 4 > 5e9:
        res.note("eager/compile attention skipped where the materialised T x T scores would exceed 5 GB.")
    add_targets(res)


def _qk_norm_rope(
    K: Any,
    device: torch.device,
    dt: torch.dtype,
    batch: int,
    seq: int,
    rounds: int,
    notes: list[str],
    comp_qk: Callable[..., Any],
    record: Callable[..., None],
    copy_peak: float,
) -> None:
    """Time the fused QK-norm + RoPE kernel against the model's eager path and its torch.compile,
    at MiniMind-3's heads (8 / 4, head dim 96)."""
    cos, sin = K.rope_tables(M3_HEAD_DIM, seq, device=device)
    q = torch.randn(batch, seq, M3_HEADS, M3_HEAD_DIM, device=device, dtype=dt, requires_grad=True)
    k = torch.randn(batch, seq, M3_KV_HEADS, M3_HEAD_DIM, device=device, dtype=dt, requires_grad=True)
    qw = (1 + 0.1 * torch.randn(M3_HEAD_DIM, device=device)).to(dt).requires_grad_(True)
    kw = (1 + 0.1 * torch.randn(M3_HEAD_DIM, device=device)).to(dt).requires_grad_(True)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    impls = {
        "triton": lambda: K.qk_norm_rope(q, k, qw, kw, cos, sin, None, 1e-6),
        "eager": lambda: K.qk_norm_rope_reference(q, k, qw, kw, cos, sin, None, 1e-6),
        "compile": lambda: comp_qk(q, k, qw, kw, cos, sin, None, 1e-6),
    }
    times = time_impls(impls, [q, k, qw, kw], (gq, gk), device, rounds, notes)
    elem = (q.numel() + k.numel()) * q.element_size()
    # Minimal traffic: fwd reads q, k and writes them; bwd reads x and dy, writes dx (weights, tables negligible).
    record(
        "qk_norm_rope",
        f"B{batch} T{seq} H{M3_HEADS}/{M3_KV_HEADS} D{M3_HEAD_DIM}",
        seq,
        times,
        "GB/s",
        {"fwd": 2 * elem, "bwd": 3 * elem, "fwd+bwd": 5 * elem},
        copy_peak,
    )
    del q, k, qw, kw, gq, gk
    log.info("qk_norm_rope T%d done", seq)


def _attention(
    res: BenchResult,
    K: Any,
    device: torch.device,
    dt: torch.dtype,
    batch: int,
    seq: int,
    packed: bool,
    rounds: int,
    notes: list[str],
    comp_attn: Callable[..., Any],
    record: Callable[..., None],
    cuda: bool,
    heads: tuple[int, int, int] = (HEADS, KV_HEADS, HEAD_DIM),
) -> None:
    """Time flash attention against SDPA (and cuDNN, eager, compiled eager) at one shape."""
    HEADS, KV_HEADS, HEAD_DIM = heads  # noqa: N806 - the module's defaults, or MiniMind-3's
    q = torch.randn(batch, seq, HEADS, HEAD_DIM, device=device, dtype=dt, requires_grad=True)
    k = torch.randn(batch, seq, KV_HEADS, HEAD_DIM, device=device, dtype=dt, requires_grad=True)
    v = torch.randn(batch, seq, KV_HEADS, HEAD_DIM, device=device, dtype=dt, requires_grad=True)
    g = torch.randn_like(q)
    if packed:
        # Four documents per row (lengths T/8, 3T/8, T/4, T/4): the packed-pretraining layout.
        pos = torch.cat([torch.arange(n) for n in (seq // 8, 3 * seq // 8, seq // 4, seq - 3 * seq // 4)])
        pos = pos.to(device).expand(batch, seq)
        # Document bounds once, outside the timed calls, as the model computes them once per forward
        # for all layers (the cu_seqlens path would time its setup kernels in every call).
        bounds = K.document_bounds(pos)
        doc = reference.document_ids(pos)
        mask = reference.attention_mask(doc, doc)
        impls: dict[str, Callable[[], Any]] = {
            "triton": lambda: K.flash_attention(q, k, v, causal=True, doc_bounds=bounds),
            "sdpa": lambda: sdpa_attention(q, k, v, mask),
        }
        shape = f"B{batch} T{seq} H{HEADS}/{KV_HEADS} D{HEAD_DIM} packed(4 docs)"
    else:
        impls = {"triton": lambda: K.flash_attention(q, k, v, causal=True), "sdpa": lambda: sdpa_attention(q, k, v)}
        if cuda:
            impls["sdpa-cudnn"] = sdpa_backend("cudnn")(lambda: sdpa_attention(q, k, v))
        # The materialised T x T scores of eager (and compiled eager) attention do not fit at long T.
        if batch * HEADS * seq * seq * 4 <= 5e9:
            impls["eager"] = lambda: eager_attention(q, k, v)
            impls["compile"] = lambda: comp_attn(q, k, v)
        shape = f"B{batch} T{seq} H{HEADS}/{KV_HEADS} D{HEAD_DIM} causal"
    times = time_impls(impls, [q, k, v], (g,), device, rounds, notes)
    fwd_flops = 4 * batch * HEADS * seq * seq * HEAD_DIM / 2  # two matmuls, causal half
    record(
        "attention",
        shape,
        seq,
        times,
        "TFLOP/s",
        {"fwd": fwd_flops, "bwd": ATTN_BWD_FACTOR * fwd_flops, "fwd+bwd": (1 + ATTN_BWD_FACTOR) * fwd_flops},
        res.find("peak: bf16 matmul")["median"],
    )
    del q, k, v, g
    _empty_cache(device)
    log.info("attention T%d %s done", seq, "packed" if packed else "causal")


def statistics_median(values: list[float]) -> float:
    return summarize(values)["median"] or 0.0


def add_targets(res: BenchResult) -> None:
    """DESIGN.md's kernel targets, per shape (both sides measured in this run)."""
    by = {(m.get("op"), m.get("shape"), m.get("direction"), m.get("impl")): m for m in res.measurements}
    for (op, shape, direction, impl), m in by.items():
        if impl != "triton":
            continue
        if op in ("rmsnorm", "rope") and direction == "fwd+bwd":
            res.target(
                f"{op} {shape} fwd+bwd: fraction of measured copy bandwidth",
                m["peak_fraction"],
                0.85,
                unit="",
                source=m["case"],
            )
            r = next((x for x in res.ratios if x["name"] == f"{op} {shape} fwd+bwd: triton vs compile"), None)
            res.target(
                f"{op} {shape} fwd+bwd: speed vs torch.compile",
                r["value"] if r else None,
                1.0,
                source=r["name"] if r else "torch.compile not measured",
            )
        if op == "attention" and direction in ("fwd", "bwd") and shape.endswith("causal"):
            r = next((x for x in res.ratios if x["name"] == f"{op} {shape} {direction}: triton vs sdpa"), None)
            res.target(
                f"flash attention {shape} {direction}: speed vs SDPA",
                r["value"] if r else None,
                1.0 if direction == "fwd" else 0.8,
                source=r["name"] if r else "SDPA not measured",
            )


# ------------------------------------------------------------------------------------------------
# CPU correctness sweep


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _grads(
    fn: Callable[..., Any], inputs: list[torch.Tensor], grads: tuple[torch.Tensor, ...]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], [t.grad for t in leaves]  # type: ignore[misc]


def run_sweep(res: BenchResult, K: Any, quick: bool) -> None:
    """Triton (interpreter) vs the fp32 reference: outputs and gradients, fp32 and bf16."""
    gen = torch.Generator().manual_seed(0)
    rows: list[list[Any]] = []
    checks: list[dict[str, Any]] = []

    def add(op: str, shape: str, what: str, err: float, tol: float, dtype: str) -> None:
        ok = err <= tol
        rows.append([op, shape, what, f"{err:.2e}", f"{tol:.0e}", "ok" if ok else "**FAIL**"])
        checks.append(
            {"op": op, "shape": shape, "check": what, "dtype": dtype, "max_abs_error": err, "tol": tol, "ok": ok}
        )

    dtypes = ((torch.float32, 1e-4),) if quick else ((torch.float32, 1e-4), (torch.bfloat16, 6e-2))
    norm_shapes = ((3, 37, 123),) if quick else ((3, 37, 123), (2, 16, 512), (1, 8, 768))
    rope_heads = ((4, 2),) if quick else ((4, 4), (4, 2), (8, 2))
    attn_cases = (
        ((4, 2, True, True, 64),)
        if quick
        else (
            (4, 4, True, False, 32),
            (4, 2, True, True, 64),
            (4, 1, False, True, 32),
            (8, 2, False, False, 64),
            (2, 1, True, False, 128),
            (8, 4, True, True, 96),
        )
    )
    t0 = time.perf_counter()
    for dtype, tol in dtypes:
        tag = "fp32" if dtype == torch.float32 else "bf16"
        for shape in norm_shapes:
            x = (torch.randn(shape, generator=gen) * 2).to(dtype)
            w = (1 + 0.2 * torch.randn(shape[-1], generator=gen)).to(dtype)
            dy = torch.randn(shape, generator=gen).to(dtype)
            (y,), (dx, dw) = _grads(lambda a, b: K.rms_norm(a, b, 1e-5), [x, w], (dy,))
            (yr,), (dxr, dwr) = _grads(
                lambda a, b: K.rms_norm_reference(a, b, 1e-5), [x.float(), w.float()], (dy.float(),)
            )
            scale = max(1.0, float(dwr.abs().max()))
            add("rmsnorm", f"{tag} {shape}", "fwd", _max_err(y, yr), tol, tag)
            add("rmsnorm", f"{tag} {shape}", "dx", _max_err(dx, dxr), tol, tag)
            add("rmsnorm", f"{tag} {shape}", "dweight", _max_err(dw, dwr) / scale, tol, tag)
        for heads, kv in rope_heads:
            q = torch.randn(3, 37, heads, 64, generator=gen).to(dtype)
            k = torch.randn(3, 37, kv, 64, generator=gen).to(dtype)
            pos = torch.arange(37).remainder(13).expand(3, 37)  # three documents per row
            cos, sin = K.rope_tables(64, 64)
            gq, gk = torch.randn(q.shape, generator=gen).to(dtype), torch.randn(k.shape, generator=gen).to(dtype)
            (qo, ko), (dq, dk) = _grads(lambda a, b: K.apply_rope(a, b, cos, sin, pos), [q, k], (gq, gk))
            (qr, kr), (dqr, dkr) = _grads(
                lambda a, b: K.apply_rope_reference(a, b, cos, sin, pos),
                [q.float(), k.float()],
                (gq.float(), gk.float()),
            )
            shape_s = f"{tag} B3 T37 H{heads}/{kv} D64 packed"
            add("rope", shape_s, "fwd", max(_max_err(qo, qr), _max_err(ko, kr)), tol, tag)
            add("rope", shape_s, "bwd", max(_max_err(dq, dqr), _max_err(dk, dkr)), tol, tag)
        for heads, kv, dim in ((8, 4, 96),) if quick else ((8, 4, 96), (4, 2, 64)):
            q = (torch.randn(3, 37, heads, dim, generator=gen) * 3).to(dtype)
            k = torch.randn(3, 37, kv, dim, generator=gen).to(dtype)
            qw = (1 + 0.2 * torch.randn(dim, generator=gen)).to(dtype)
            kw = (1 + 0.2 * torch.randn(dim, generator=gen)).to(dtype)
            pos = torch.arange(37).remainder(13).expand(3, 37)
            cos, sin = K.rope_tables(dim, 64)
            gq, gk = torch.randn(q.shape, generator=gen).to(dtype), torch.randn(k.shape, generator=gen).to(dtype)
            (qo, ko), (dq, dk, dqw, dkw) = _grads(
                lambda a, b, c, d: K.qk_norm_rope(a, b, c, d, cos, sin, pos, 1e-6), [q, k, qw, kw], (gq, gk)
            )
            (qr, kr), (dqr, dkr, dqwr, dkwr) = _grads(
                lambda a, b, c, d: K.qk_norm_rope_reference(a, b, c, d, cos, sin, pos, 1e-6),
                [q.float(), k.float(), qw.float(), kw.float()],
                (gq.float(), gk.float()),
            )
            shape_s = f"{tag} B3 T37 H{heads}/{kv} D{dim} packed"
            scale = max(1.0, float(dqwr.abs().max()), float(dkwr.abs().max()))
            add("qk_norm_rope", shape_s, "fwd", max(_max_err(qo, qr), _max_err(ko, kr)), tol, tag)
            add("qk_norm_rope", shape_s, "dq, dk", max(_max_err(dq, dqr), _max_err(dk, dkr)), tol, tag)
            add("qk_norm_rope", shape_s, "dweights", max(_max_err(dqw, dqwr), _max_err(dkw, dkwr)) / scale, tol, tag)
        for heads, kv, causal, docs, dim in attn_cases:
            seq = 37
            q = torch.randn(3, seq, heads, dim, generator=gen).to(dtype)
            k = torch.randn(3, seq, kv, dim, generator=gen).to(dtype)
            v = torch.randn(3, seq, kv, dim, generator=gen).to(dtype)
            do = torch.randn(q.shape, generator=gen).to(dtype)
            cu = torch.tensor([0, 10, 11, 37, 50, 74, 100, 111], dtype=torch.int32) if docs else None
            (o,), (dq, dk, dv) = _grads(
                lambda a, b, c: K.flash_attention(a, b, c, causal=causal, cu_seqlens=cu), [q, k, v], (do,)
            )
            (orf,), (dqr, dkr, dvr) = _grads(
                lambda a, b, c: K.flash_attention_reference(a, b, c, causal=causal, cu_seqlens=cu),
                [q.float(), k.float(), v.float()],
                (do.float(),),
            )
            shape_s = f"{tag} B3 T{seq} H{heads}/{kv} D{dim}{' causal' if causal else ''}{' docs' if docs else ''}"
            add("attention", shape_s, "fwd", _max_err(o, orf), tol, tag)
            add(
                "attention",
                shape_s,
                "bwd",
                max(_max_err(dq, dqr), _max_err(dk, dkr), _max_err(dv, dvr)) / (heads // kv),
                tol,
                tag,
            )
        log.info("correctness sweep %s done (%.0fs)", tag, time.perf_counter() - t0)
    failed = sum(not c["ok"] for c in checks)
    res.extra["checks"] = checks
    res.extra["failed"] = failed
    res.table(
        "Correctness sweep (Triton interpreter vs fp32 reference)",
        ["op", "shape / dtype", "checked", "max abs error", "tolerance", "result"],
        rows,
    )
    res.note(
        "No timings on CPU: the kernels run in Triton's interpreter, about 100x slower than PyTorch, so "
        "its speed says nothing about a GPU. This run checks correctness only."
    )
    res.note(
        "bf16 rows compare bf16 kernels with fp32 math; attention dK/dV errors are divided by the GQA group size; "
        "the rmsnorm and qk_norm_rope weight-gradient errors are relative to max(1, |dweight|)."
    )
    res.note(f"{len(checks) - failed}/{len(checks)} checks within tolerance.")


def _plot_sweep(res: BenchResult, fig: Any) -> None:
    checks = res.extra.get("checks", [])
    dtypes = sorted({c["dtype"] for c in checks}, reverse=True)
    for i, dtype in enumerate(dtypes):
        ax = fig.add_subplot(1, len(dtypes), i + 1)
        groups: dict[str, list[dict[str, Any]]] = {}
        for c in checks:
            if c["dtype"] == dtype:
                groups.setdefault(f"{c['op']} {c['check']}", []).append(c)
        labels = list(groups)
        worst = [max(max(c["max_abs_error"] for c in g), 1e-12) for g in groups.values()]
        tol = max(c["tol"] for g in groups.values() for c in g)
        colors = ["tab:green" if w <= tol else "tab:red" for w in worst]
        ys = list(range(len(labels)))[::-1]
        ax.barh(ys, worst, color=colors)
        ax.axvline(tol, color="black", ls="--", lw=1, label=f"tolerance {tol:.0e}")
        ax.set_xscale("log")
        ax.set_yticks(ys)
        ax.set_yticklabels([f"{lab} ({len(groups[lab])} shapes)" for lab in labels], fontsize=9)
        ax.set_xlabel("worst max-abs error vs fp32 reference (log scale)")
        ax.set_title(f"{dtype}: Triton interpreter vs reference", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("llmcore kernels on CPU: correctness sweep only (no timings without a GPU)", fontsize=11)


def _plot_timing(res: BenchResult, fig: Any) -> None:
    ms = [m for m in res.measurements if m.get("op")]
    panels = [
        ("rmsnorm", "fwd+bwd", "GB/s"),
        ("rope", "fwd+bwd", "GB/s"),
        ("qk_norm_rope", "fwd+bwd", "GB/s"),
        ("attention", "fwd", "TFLOP/s"),
        ("attention", "bwd", "TFLOP/s"),
    ]
    peaks = {"GB/s": res.find("peak: device copy")["median"], "TFLOP/s": res.find("peak: bf16 matmul")["median"]}
    for i, (op, direction, unit) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        series: dict[str, list[tuple[int, float, float, float]]] = {}
        for m in ms:
            if m["op"] != op or m["direction"] != direction or m["median"] is None:
                continue
            if op == "attention" and "packed" in m["shape"]:
                name = m["impl"] + " (packed)"
            elif op == "attention" and f"D{M3_HEAD_DIM}" in m["shape"]:
                name = m["impl"] + f" (D{M3_HEAD_DIM})"
            else:
                hidden = m["shape"].split(" h")[-1] if op == "rmsnorm" else None
                name = m["impl"] + (f" h{hidden}" if hidden else "")
            series.setdefault(name, []).append((m["seq"], m["median"], m["min"], m["max"]))
        colors = {
            "triton": "tab:red",
            "sdpa": "tab:blue",
            "sdpa-cudnn": "tab:cyan",
            "eager": "tab:gray",
            "compile": "tab:green",
        }
        seen = sorted({p[0] for pts in series.values() for p in pts})
        for i, (name, pts) in enumerate(sorted(series.items())):
            pts.sort()
            impl = name.split()[0]
            ax.errorbar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                marker="o",
                ms=4,
                capsize=2,
                label=name,
                color=colors.get(impl),
                ls="--" if i % 2 and op == "rmsnorm" or "packed" in name else "-",
                lw=2 if impl == "triton" else 1,
            )
        ax.axhline(peaks[unit], color="black", ls=":", lw=1, label=f"measured peak {fmt(peaks[unit])}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(seen)
        ax.set_xticklabels([str(x) for x in seen])
        ax.minorticks_off()
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(f"{op} {direction}", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"llmcore kernels vs PyTorch on {res.machine.get('gpu') or 'CPU (dry run)'} ({res.settings.get('dtype')}, batch "
        f"{res.settings.get('batch')}, heads {HEADS}/{KV_HEADS}, head dim {HEAD_DIM}); higher is better",
        fontsize=11,
    )


def run_kernels(
    device: torch.device,
    quick: bool = False,
    batch: int | None = None,
    seqs: list[int] | None = None,
    hiddens: list[int] | None = None,
    repeats: int | None = None,
    dry_run_timing: bool = False,
    budget_s: float | None = None,
    command: str | None = None,
) -> BenchResult:
    """The kernels benchmark on `device` (see the module docstring); returns the result, not yet written."""
    K = _import_kernels(device)
    timing = device.type == "cuda" or dry_run_timing
    if timing:
        toy = device.type != "cuda"
        batch = batch or (1 if toy else (4 if quick else 32))
        seqs = seqs or ([16, 32] if toy else ([512] if quick else [512, 1024, 2048, 4096]))
        hiddens = hiddens or ([64] if toy else ([512] if quick else [512, 768]))
        repeats = repeats or (2 if quick or toy else 3)
        settings = {
            "dtype": "bf16" if not toy else "fp32",
            "batch": batch,
            "heads": f"{HEADS}/{KV_HEADS}",
            "head_dim": HEAD_DIM,
            "seqs": seqs,
            "hiddens": hiddens,
            "repeats (interleaved rounds)": repeats,
            "timer": "triton.testing.do_bench median per round" if not toy else "wall clock (dry run)",
        }
        res = BenchResult(
            "kernels",
            device,
            settings,
            quick=quick or toy,
            command=command,
            title="Kernel benchmark: Triton vs eager, torch.compile and SDPA"
            + (" (CPU DRY RUN: meaningless numbers)" if toy else ""),
        )
        run_timing(res, device, batch, seqs, hiddens, repeats, K, dry_run=toy, budget_s=budget_s)
        res.plot = _plot_timing
        res.figsize = (21, 5.5)
        res.note(
            "GB/s = minimal bytes the op must move / time; attention TFLOP/s = causal matmul FLOPs "
            f"(backward counted as {ATTN_BWD_FACTOR}x forward) / time; ratios are triton speed over the "
            "baseline's (above 1: triton faster)."
        )
    else:
        res = BenchResult(
            "kernels",
            device,
            {"mode": "correctness sweep (Triton interpreter)", "shapes": "quick subset" if quick else "full"},
            quick=quick,
            command=command,
            title="Kernel benchmark on CPU: correctness sweep only (Triton interpreter, no timings)",
        )
        run_sweep(res, K, quick)
        res.plot = _plot_sweep
    return res


__all__ = ["run_kernels", "eager_rope", "eager_attention", "sdpa_attention", "add_targets"]


def plot_for(res: BenchResult) -> Any:
    """The plot function for a result of this benchmark (used to redraw from json)."""
    return _plot_timing if "seqs" in res.settings else _plot_sweep


def targets_for(res: BenchResult) -> None:
    """Recompute the targets of a finished timing result from its stored ratios (no measuring)."""
    if "seqs" in res.settings:
        res.targets = []
        add_targets(res)

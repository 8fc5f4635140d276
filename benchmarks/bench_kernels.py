"""Kernel benchmark: Triton vs eager vs torch.compile (vs SDPA for attention) at MiniMind shapes.

    python benchmarks/bench_kernels.py                 # GPU: timings; CPU: correctness sweep only
    python benchmarks/bench_kernels.py --seqs 512 1024 # fewer shapes

On CUDA, for every op and direction (fwd, bwd, fwd+bwd) it times each implementation in bf16
(median of ``triton.testing.do_bench``) and reports achieved GB/s (RMSNorm, RoPE: the minimal
bytes the op must move) or TFLOP/s (attention: causal matmul FLOPs) against peaks measured on
the same card in the same run (a large device-to-device copy; a large bf16 matmul). It checks
the design card's targets and writes ``benchmarks/results/kernels_<card>.{csv,md,png}``.

Without a GPU there is nothing meaningful to time (the kernels run in Triton's interpreter,
~100x slower than torch), so it runs a correctness sweep instead: small shapes, Triton vs the
reference, forward and gradients, and writes ``kernels_cpu_interpreter.{csv,md,png}``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Must precede the first triton import (llmcore.kernels): CPU tensors need the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from llmcore.kernels import (  # noqa: E402
    apply_rope,
    apply_rope_reference,
    flash_attention,
    flash_attention_reference,
    rms_norm,
    rms_norm_reference,
    rope_tables,
)

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["card", "op", "shape", "direction", "impl", "ms", "metric", "value", "peak_fraction", "speedup_vs_triton", "note"]


# ------------------------------------------------------------------------------------------------
# eager baselines (what a model without custom kernels runs)
# ------------------------------------------------------------------------------------------------


def eager_rope(q, k, cos, sin):
    """HF Llama-style RoPE in the input dtype (tables gathered and cast per call)."""
    seq = q.shape[1]
    c = cos[:seq].to(q.dtype)[None, :, None, :]
    s = sin[:seq].to(q.dtype)[None, :, None, :]

    def rot(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * c + rot(q) * s, k * c + rot(k) * s


def eager_attention(q, k, v):
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


def sdpa_attention(q, k, v):
    """PyTorch's fused attention (FlashAttention-2 / cuDNN / efficient backends), causal, GQA."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    try:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    except (TypeError, RuntimeError):  # older builds: no GQA support in the fused kernels
        rep = q.shape[2] // k.shape[2]
        out = F.scaled_dot_product_attention(qt, kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1), is_causal=True)
    return out.transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# GPU timing
# ------------------------------------------------------------------------------------------------


def card_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu (Triton interpreter)"


def card_tag(name: str) -> str:
    if not torch.cuda.is_available():
        return "cpu_interpreter"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _bench_ms(fn, grad_to_none=None) -> float:
    if not torch.cuda.is_available():  # --cpu-dry-run: a plain wall-clock median, only to exercise the code
        times = []
        for _ in range(3):
            for t in grad_to_none or []:
                t.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[1]
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def measure_peaks(dev: str) -> dict[str, float]:
    """Copy bandwidth (GB/s, read+write) and dense bf16 matmul throughput (TFLOP/s) of this card."""
    n = 1 << 30 if dev == "cuda" else 1 << 24  # 1 GiB each way: far beyond L2, so this is HBM bandwidth
    src = torch.empty(n // 2, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    ms = _bench_ms(lambda: dst.copy_(src))
    copy_gbs = 2 * n / (ms * 1e-3) / 1e9
    del src, dst
    m = 8192 if dev == "cuda" else 256
    a = torch.randn(m, m, dtype=torch.bfloat16, device=dev)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=dev)
    ms = _bench_ms(lambda: a @ b)
    mm_tflops = 2 * m**3 / (ms * 1e-3) / 1e12
    del a, b
    _empty_cache()
    return {"copy_gbs": copy_gbs, "matmul_tflops": mm_tflops}


def _directions(fn, inputs, grad):
    """Callables for fwd, bwd (backward of one recorded forward) and fwd+bwd."""

    def fwd():
        return fn()

    def fwd_bwd():
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, grad)

    out = fn()
    outs = out if isinstance(out, tuple) else (out,)

    def bwd():
        torch.autograd.backward(outs, grad, retain_graph=True)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def _time_impls(impls: dict, inputs: list[torch.Tensor], grad) -> dict[tuple[str, str], float]:
    times = {}
    for impl, fn in impls.items():
        try:
            for direction, call in _directions(fn, inputs, grad).items():
                times[(impl, direction)] = _bench_ms(call, grad_to_none=inputs)
        except torch.cuda.OutOfMemoryError:
            _empty_cache()
            times[(impl, "fwd")] = float("nan")
        for t in inputs:
            t.grad = None
        _empty_cache()
    return times


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_gpu(args) -> list[dict]:
    torch._dynamo.config.cache_size_limit = 256  # one static graph per shape is the point
    card = card_name()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    peaks = measure_peaks(dev)
    print(f"card: {card}")
    print(f"measured peaks: copy {peaks['copy_gbs']:.0f} GB/s, bf16 matmul {peaks['matmul_tflops']:.0f} TFLOP/s")
    rows: list[dict] = [
        dict(card=card, op="peak", shape="copy 1 GiB", direction="-", impl="torch", ms="", metric="GB/s",
             value=round(peaks["copy_gbs"], 1), peak_fraction=1.0, speedup_vs_triton="", note="copy bandwidth"),
        dict(card=card, op="peak", shape="8192^3 bf16", direction="-", impl="torch", ms="", metric="TFLOP/s",
             value=round(peaks["matmul_tflops"], 1), peak_fraction=1.0, speedup_vs_triton="", note="matmul peak"),
    ]
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    batch, heads, kv_heads, head_dim = args.batch, 8, 2, 64
    if dev == "cuda":
        compiled_norm = torch.compile(rms_norm_reference, dynamic=False)
        compiled_rope = torch.compile(eager_rope, dynamic=False)
        compiled_attn = torch.compile(eager_attention, dynamic=False)
    else:  # dry run: no C++ toolchain assumed; the eager functions stand in for the compiled ones
        compiled_norm, compiled_rope, compiled_attn = rms_norm_reference, eager_rope, eager_attention

    def record(op, shape, times, metric, amount_by_dir, peak, note=""):
        for (impl, direction), ms in sorted(times.items()):
            if direction not in amount_by_dir:
                continue
            value = amount_by_dir[direction] / (ms * 1e-3) / (1e9 if metric == "GB/s" else 1e12) if ms == ms else float("nan")
            ref = times.get(("triton", direction))
            rows.append(dict(card=card, op=op, shape=shape, direction=direction, impl=impl, ms=round(ms, 4),
                             metric=metric, value=round(value, 2), peak_fraction=round(value / peak, 3),
                             speedup_vs_triton=round(ms / ref, 3) if ref else "", note=note))
            print(f"  {op:9s} {shape:28s} {direction:8s} {impl:8s} {ms:9.4f} ms {value:9.1f} {metric}")

    for hidden in args.hiddens:
        for seq in args.seqs:
            x = torch.randn(batch, seq, hidden, device=dev, dtype=dt, requires_grad=True)
            w = (1 + 0.1 * torch.randn(hidden, device=dev)).to(dt).requires_grad_(True)
            g = torch.randn_like(x)
            impls = {"triton": lambda: rms_norm(x, w, 1e-5), "eager": lambda: rms_norm_reference(x, w, 1e-5),
                     "compile": lambda: compiled_norm(x, w, 1e-5)}
            times = _time_impls(impls, [x, w], (g,))
            elem = x.numel() * x.element_size()
            # Minimal traffic: fwd reads x, writes y; bwd reads x and dy, writes dx (weight, rstd negligible).
            record("rmsnorm", f"B{batch} T{seq} h{hidden}", times, "GB/s",
                   {"fwd": 2 * elem, "bwd": 3 * elem, "fwd+bwd": 5 * elem}, peaks["copy_gbs"])
            del x, w, g

    cos, sin = rope_tables(head_dim, max(args.seqs), device=dev)
    for seq in args.seqs:
        q = torch.randn(batch, seq, heads, head_dim, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(batch, seq, kv_heads, head_dim, device=dev, dtype=dt, requires_grad=True)
        gq, gk = torch.randn_like(q), torch.randn_like(k)
        impls = {"triton": lambda: apply_rope(q, k, cos, sin), "eager": lambda: eager_rope(q, k, cos, sin),
                 "compile": lambda: compiled_rope(q, k, cos, sin)}
        times = _time_impls(impls, [q, k], (gq, gk))
        elem = (q.numel() + k.numel()) * q.element_size()
        record("rope", f"B{batch} T{seq} H{heads}/{kv_heads} D{head_dim}", times, "GB/s",
               {"fwd": 2 * elem, "bwd": 2 * elem, "fwd+bwd": 4 * elem}, peaks["copy_gbs"])
        del q, k, gq, gk

    for seq in args.seqs:
        q = torch.randn(batch, seq, heads, head_dim, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(batch, seq, kv_heads, head_dim, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(batch, seq, kv_heads, head_dim, device=dev, dtype=dt, requires_grad=True)
        g = torch.randn_like(q)
        impls = {"triton": lambda: flash_attention(q, k, v, causal=True), "sdpa": lambda: sdpa_attention(q, k, v)}
        # The materialised T x T scores of eager (and compiled eager) attention do not fit at long T.
        materialised = batch * heads * seq * seq * 4
        if materialised <= 5e9:
            impls["eager"] = lambda: eager_attention(q, k, v)
            impls["compile"] = lambda: compiled_attn(q, k, v)
        times = _time_impls(impls, [q, k, v], (g,))
        fwd_flops = 4 * batch * heads * seq * seq * head_dim / 2  # two matmuls, causal half
        note = "" if materialised <= 5e9 else "eager/compile skipped: T x T scores too large"
        record("attention", f"B{batch} T{seq} H{heads}/{kv_heads} D{head_dim}", times, "TFLOP/s",
               {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}, peaks["matmul_tflops"], note)
        del q, k, v, g
        _empty_cache()
    return rows


def check_targets(rows: list[dict]) -> list[str]:
    """The design card's GPU targets, one line each, PASS/FAIL."""
    lines = []
    by = {(r["op"], r["shape"], r["direction"], r["impl"]): r for r in rows}
    for (op, shape, direction, impl), r in sorted(by.items()):
        if impl != "triton":
            continue
        if op in ("rmsnorm", "rope") and direction == "fwd+bwd":
            comp = by.get((op, shape, direction, "compile"))
            ok_bw = r["peak_fraction"] >= 0.85
            ok_comp = comp is not None and r["ms"] <= comp["ms"]
            lines.append(f"{'PASS' if ok_bw and ok_comp else 'FAIL'} {op} {shape} fwd+bwd: "
                         f"{r['peak_fraction']:.0%} of copy bandwidth (target 85%), "
                         f"{comp['ms'] / r['ms'] if comp else float('nan'):.2f}x torch.compile (target >1)")
        if op == "attention" and direction in ("fwd", "bwd"):
            sdpa = by.get((op, shape, direction, "sdpa"))
            ratio = sdpa["ms"] / r["ms"] if sdpa else float("nan")
            need = 1.0 if direction == "fwd" else 0.8
            lines.append(f"{'PASS' if ratio >= need else 'FAIL'} attention {shape} {direction}: "
                         f"{ratio:.2f}x SDPA speed (target {need}x), {r['value']} TFLOP/s")
    return lines


# ------------------------------------------------------------------------------------------------
# CPU correctness sweep
# ------------------------------------------------------------------------------------------------


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _grads(fn, inputs, grads):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], [t.grad for t in leaves]


def run_cpu_sweep() -> list[dict]:
    card = card_name()
    gen = torch.Generator().manual_seed(0)
    rows: list[dict] = []

    def add(op, shape, what, err, tol):
        ok = err <= tol
        rows.append(dict(card=card, op=op, shape=shape, direction=what, impl="triton vs reference", ms="",
                         metric="max abs error", value=f"{err:.2e}", peak_fraction="",
                         speedup_vs_triton="", note=f"tol {tol:.0e} {'ok' if ok else 'FAIL'}"))
        print(f"  {op:9s} {shape:34s} {what:8s} max err {err:.2e} (tol {tol:.0e}) {'ok' if ok else 'FAIL'}")

    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 6e-2)):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        for shape in ((3, 37, 123), (2, 16, 512), (1, 8, 768)):
            x = (torch.randn(shape, generator=gen) * 2).to(dtype)
            w = (1 + 0.2 * torch.randn(shape[-1], generator=gen)).to(dtype)
            dy = torch.randn(shape, generator=gen).to(dtype)
            (y,), (dx, dw) = _grads(lambda a, b: rms_norm(a, b, 1e-5), [x, w], (dy,))
            (yr,), (dxr, dwr) = _grads(lambda a, b: rms_norm_reference(a, b, 1e-5), [x.float(), w.float()], (dy.float(),))
            scale = max(1.0, float(dwr.abs().max()))
            add("rmsnorm", f"{tag} {shape}", "fwd", _max_err(y, yr), tol)
            add("rmsnorm", f"{tag} {shape}", "dx", _max_err(dx, dxr), tol)
            add("rmsnorm", f"{tag} {shape}", "dweight", _max_err(dw, dwr) / scale, tol)

        for heads, kv in ((4, 4), (4, 2), (8, 2)):
            q = torch.randn(3, 37, heads, 64, generator=gen).to(dtype)
            k = torch.randn(3, 37, kv, 64, generator=gen).to(dtype)
            pos = torch.arange(37).remainder(13).expand(3, 37)  # three documents per row
            cos, sin = rope_tables(64, 64)
            gq, gk = torch.randn(q.shape, generator=gen).to(dtype), torch.randn(k.shape, generator=gen).to(dtype)
            (qo, ko), (dq, dk) = _grads(lambda a, b: apply_rope(a, b, cos, sin, pos), [q, k], (gq, gk))
            (qr, kr), (dqr, dkr) = _grads(lambda a, b: apply_rope_reference(a, b, cos, sin, pos), [q.float(), k.float()],
                                          (gq.float(), gk.float()))
            shape = f"{tag} B3 T37 H{heads}/{kv} D64 packed"
            add("rope", shape, "fwd", max(_max_err(qo, qr), _max_err(ko, kr)), tol)
            add("rope", shape, "bwd", max(_max_err(dq, dqr), _max_err(dk, dkr)), tol)

        for heads, kv, causal, docs, dim in ((4, 4, True, False, 32), (4, 2, True, True, 64), (4, 1, False, True, 32),
                                             (8, 2, False, False, 64), (2, 1, True, False, 128)):
            seq = 37
            q = torch.randn(3, seq, heads, dim, generator=gen).to(dtype)
            k = torch.randn(3, seq, kv, dim, generator=gen).to(dtype)
            v = torch.randn(3, seq, kv, dim, generator=gen).to(dtype)
            do = torch.randn(q.shape, generator=gen).to(dtype)
            cu = torch.tensor([0, 10, 11, 37, 50, 74, 100, 111], dtype=torch.int32) if docs else None
            (o,), (dq, dk, dv) = _grads(lambda a, b, c: flash_attention(a, b, c, causal=causal, cu_seqlens=cu), [q, k, v], (do,))
            (orf,), (dqr, dkr, dvr) = _grads(lambda a, b, c: flash_attention_reference(a, b, c, causal=causal, cu_seqlens=cu),
                                             [q.float(), k.float(), v.float()], (do.float(),))
            shape = f"{tag} B3 T{seq} H{heads}/{kv} D{dim}{' causal' if causal else ''}{' docs' if docs else ''}"
            add("attention", shape, "fwd", _max_err(o, orf), tol)
            add("attention", shape, "bwd", max(_max_err(dq, dqr), _max_err(dk, dkr), _max_err(dv, dvr)) / (heads // kv), tol)
    return rows


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------


def write_outputs(rows: list[dict], out_dir: Path, tag: str, header: list[str], footer: list[str], timing: bool) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"kernels_{tag}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    md_path = out_dir / f"kernels_{tag}.md"
    if timing:
        cols = ["op", "shape", "direction", "impl", "ms", "value", "metric", "peak_fraction", "speedup_vs_triton", "note"]
        names = cols
    else:
        cols = ["op", "shape", "direction", "value", "note"]
        names = ["op", "shape / dtype", "checked", "max abs error", "tolerance"]
    lines = [*header, "", "| " + " | ".join(names) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    lines += ["", *footer, ""]
    md_path.write_text("\n".join(lines))
    png_path = out_dir / f"kernels_{tag}.png"
    _plot(rows, png_path, timing)
    return [csv_path, md_path, png_path]


def _plot(rows: list[dict], path: Path, timing: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not timing:
        fig, ax = plt.subplots(figsize=(12, 5))
        labels = [f"{r['op']} {r['shape']} {r['direction']}" for r in rows]
        values = [max(float(r["value"]), 1e-12) for r in rows]
        colors = {"rmsnorm": "tab:blue", "rope": "tab:orange", "attention": "tab:green"}
        ax.bar(range(len(values)), values, color=[colors[r["op"]] for r in rows])
        ax.set_yscale("log")
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(labels, rotation=90, fontsize=5)
        ax.set_ylabel("max abs error vs reference")
        ax.set_title("CPU correctness sweep (Triton interpreter; no timings without a GPU)")
        fig.tight_layout()
        fig.savefig(path, dpi=130)
        plt.close(fig)
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, op in zip(axes, ("rmsnorm", "rope", "attention")):
        sel = [r for r in rows if r["op"] == op and r["direction"] == ("fwd+bwd" if op != "attention" else "fwd")]
        series: dict[str, list[tuple[int, float]]] = {}
        for r in sel:
            seq = int(re.search(r"T(\d+)", r["shape"]).group(1))
            hidden = re.search(r" h(\d+)", r["shape"])
            name = r["impl"] + (f" h{hidden.group(1)}" if hidden else "")
            series.setdefault(name, []).append((seq, float(r["value"])))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        peak = next((float(r["value"]) for r in rows if r["op"] == "peak" and r["metric"] == (sel[0]["metric"] if sel else "")), None)
        if peak:
            ax.axhline(peak, color="gray", linestyle="--", label="measured peak")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(sel[0]["metric"] if sel else "")
        ax.set_title(f"{op} ({'fwd+bwd' if op != 'attention' else 'fwd, causal'})")
        ax.legend(fontsize=7)
    fig.suptitle(f"llmcore kernels on {rows[0]['card']} (bf16)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--hiddens", type=int, nargs="+", default=[512, 768])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the GPU timing code on CPU (interpreter, tiny shapes) to test the script; numbers are meaningless")
    args = parser.parse_args(argv)
    started = time.time()
    card = card_name()
    tag = card_tag(card)
    if args.cpu_dry_run and not torch.cuda.is_available():
        args.batch, args.seqs, args.hiddens = 1, [16, 32], [64]
        rows = run_gpu(args)
        for line in check_targets(rows):
            print("  " + line)
        paths = write_outputs(rows, args.out, "cpu_dry_run", ["# dry run (meaningless numbers)"], [], timing=True)
        print("wrote " + ", ".join(str(p) for p in paths))
        return 0
    if torch.cuda.is_available():
        print(f"GPU benchmark on {card} (bf16, batch {args.batch}, 8 heads / 2 KV heads, head dim 64)")
        rows = run_gpu(args)
        targets = check_targets(rows)
        print("targets (design card):")
        for line in targets:
            print("  " + line)
        header = [f"# Kernel benchmark: {card}", "",
                  f"bf16, batch {args.batch}, heads 8 / KV heads 2, head dim 64; median of triton.testing.do_bench; "
                  "GB/s = minimal bytes moved / time; attention TFLOP/s = causal matmul FLOPs (bwd = 2.5x fwd) / time; "
                  "speedup_vs_triton = impl time / triton time (>1: triton faster)."]
        footer = ["## Targets", "", *[f"- {t}" for t in targets]]
        failed = 0
    else:
        print("No CUDA device: running the CPU CORRECTNESS SWEEP ONLY (Triton interpreter, small shapes).")
        print("No timings are taken: interpreter speed says nothing about GPU speed.")
        rows = run_cpu_sweep()
        failed = sum("FAIL" in r["note"] for r in rows)
        header = ["# Kernel correctness sweep (CPU, Triton interpreter)", "",
                  "No GPU was available, so no timings: max abs error of Triton vs the fp32 reference, "
                  "forward and gradients, on small shapes (bf16 rows compare bf16 kernels with fp32 math; "
                  "attention dK/dV errors divided by the GQA group size)."]
        footer = [f"{len(rows) - failed}/{len(rows)} checks within tolerance."]
    paths = write_outputs(rows, args.out, tag, header, footer, timing=torch.cuda.is_available())
    print("wrote " + ", ".join(str(p) for p in paths) + f" in {time.time() - started:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

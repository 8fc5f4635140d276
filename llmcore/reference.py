"""Plain-PyTorch ops of the model: its eager path, and the truth the Triton kernels are tested against.

One copy of each piece of math the model needs besides its layers' weights:
- RoPE: `rope_tables` (with the YaRN option), `rotate_half`, `rope_rows` + `apply_rope_rows`
  (the model gathers the table rows once per forward and rotates in every layer) and
  `apply_rope_reference` (both steps, the signature of the kernel `apply_rope`);
- `rms_norm_reference` (the signature of the kernel `rms_norm`);
- `qk_norm_rope_reference`: QK-norm (RMSNorm over head_dim) then RoPE, the two functions above
  composed (the signature of the kernel `qk_norm_rope`);
- documents in packed rows: `document_ids`, `cu_seqlens_from_position_ids`,
  `document_ids_from_cu_seqlens`, and the boolean masks `causal_mask` / `attention_mask`;
- `attention_reference`: materialised attention with GQA, causal masking and per-document masks
  from `position_ids` or `cu_seqlens` (the signature of the kernel `flash_attention`, plus the
  model's explicit mask and dropout).

`llmcore.model` (eager and sdpa backends) uses these functions, and `llmcore.kernels` re-exports
the references under its `*_reference` names. This module imports no Triton, so the model loads
on machines without it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# RoPE (rotate-half layout of HF Llama / MiniMind)


def rope_tables(
    head_dim: int,
    max_positions: int,
    theta: float = 1e6,
    scaling: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `(cos, sin)` tables of shape `(max_positions, head_dim)`, each half repeated.

    Row `p` serves a token at position `p`. Computed in float64 on `device` (CPU by default).
    `scaling`: YaRN as MiniMind's `rope_scaling` (`{"type": "yarn", "factor",
    "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"}`); None =
    plain RoPE. Arguments follow `ModelConfig`: head_dim, max_position_embeddings, rope_theta,
    rope_scaling.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    attn_factor = 1.0
    if scaling is not None:
        # YaRN: low-frequency dims (long wavelengths) are interpolated by `factor`, high-frequency
        # dims are kept, with a linear ramp between the two correction dims.
        orig = scaling.get("original_max_position_embeddings", 2048)
        factor = scaling.get("factor", 16)
        beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)
        attn_factor = scaling.get("attention_factor", 1.0)
        if max_positions > orig:

            def corr_dim(n_rot: float) -> float:
                return head_dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

            low = max(math.floor(corr_dim(beta_fast)), 0)
            high = min(math.ceil(corr_dim(beta_slow)), head_dim // 2 - 1)
            ramp = (
                (torch.arange(head_dim // 2, dtype=torch.float64, device=device) - low) / max(high - low, 1e-3)
            ).clamp(0, 1)
            inv_freq = inv_freq * (1 - ramp + ramp / factor)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * attn_factor).float(), (angles.sin() * attn_factor).float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [-x2, x1]` over the last dim (HF Llama's helper)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_rows(cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The table rows of each token: `(B, T, 1, D)` fp32 (broadcast over heads) for `position_ids` `(B, T)`."""
    return cos.float()[position_ids].unsqueeze(2), sin.float()[position_ids].unsqueeze(2)


def apply_rope_rows(
    q: torch.Tensor, k: torch.Tensor, cos_rows: torch.Tensor, sin_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`x * cos + rotate_half(x) * sin` in fp32 for q `(B, T, H, D)` and k `(B, T, Hkv, D)`, with
    `cos_rows`/`sin_rows` from `rope_rows`; outputs in q's and k's dtypes."""
    # One cast per use, as the model's eager path always had: for bf16 inputs the two partial
    # gradients are rounded to bf16 before they are summed. Casting once would sum them in fp32
    # (slightly more accurate) but would change the bits of every bf16 training step.
    q_out = q.float() * cos_rows + rotate_half(q.float()) * sin_rows
    k_out = k.float() * cos_rows + rotate_half(k.float()) * sin_rows
    return q_out.to(q.dtype), k_out.to(k.dtype)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE with the kernel `apply_rope`'s signature: `(max_positions, D)` tables, row `p` for a
    token at position `p` from `position_ids` `(B, T)` or `arange(T)`; fp32 math, outputs in q's
    and k's dtypes."""
    if position_ids is None:
        seq_len = q.shape[1]
        position_ids = torch.arange(seq_len, device=q.device).unsqueeze(0).expand(q.shape[0], seq_len)
    return apply_rope_rows(q, k, *rope_rows(cos, sin, position_ids))


# ----------------------------------------------------------------------------------------------
# RMSNorm


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """HF Llama / MiniMind RMSNorm: normalise over the last dim in fp32, round to x's dtype, times weight.

    The result has x's dtype when weight has it too (as the kernel `rms_norm`); mixed dtypes
    follow torch's promotion, as the HF module does.
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def qk_norm_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3 / MiniMind-3 QK-norm then RoPE, with the kernel `qk_norm_rope`'s signature.

    q `(B, T, H, D)`, k `(B, T, Hkv, D)`; `q_weight`/`k_weight` `(D,)` (one RMSNorm weight per
    layer shared by all heads); tables and `position_ids` as `apply_rope_reference`. Exactly what
    the model's eager path does: `rms_norm_reference` over head_dim, then the rotation.
    """
    return apply_rope_reference(
        rms_norm_reference(q, q_weight, eps), rms_norm_reference(k, k_weight, eps), cos, sin, position_ids
    )


# ----------------------------------------------------------------------------------------------
# Documents in packed rows


def document_ids(position_ids: torch.Tensor, first_is_start: bool = True) -> torch.Tensor:
    """Per-token document index within its row `(B, T)`: +1 at every `position_ids == 0` and (when
    `first_is_start`) at the row start, so the first document is 1."""
    starts = position_ids == 0
    if first_is_start:
        starts[:, 0] = True
    return starts.long().cumsum(dim=1)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 `cu_seqlens` for packed rows: a document starts wherever `position_ids == 0` and at every row start.

    `position_ids` `(B, T)` as the packed loader yields them; offsets into the flattened `B*T`
    tokens from 0 to `B*T` (FlashAttention's varlen layout). The result has a data-dependent
    length, so on CUDA this synchronises once; compute it once per batch and share it across layers.
    """
    batch, seq_len = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    offsets = torch.nonzero(starts.reshape(-1), as_tuple=False).flatten()
    end = torch.tensor([batch * seq_len], device=position_ids.device, dtype=offsets.dtype)
    return torch.cat((offsets, end)).to(torch.int32)


def document_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Document index `(B, T)` of every token from `cu_seqlens` (offsets into the flattened `B*T` tokens).

    Ids are global (not per row); compare them within a row only, as `attention_mask` does.
    """
    tok = torch.arange(batch * seq_len, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens.to(torch.int64), tok, right=True).view(batch, seq_len)


def causal_mask(q_len: int, k_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`(q_len, k_len)` bool, True where a query may see a key: queries are the last `q_len` of the
    `k_len` positions (a KV cache holds the earlier ones)."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def attention_mask(q_doc: torch.Tensor, k_doc: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """`(B, 1, Tq, Tk)` bool for SDPA / `attention_reference`: a query sees the keys of its own
    document (equal ids in `q_doc` `(B, Tq)` and `k_doc` `(B, Tk)`), and when `causal` only those
    up to its own position (queries are the last `Tq` of the `Tk` positions)."""
    allowed = q_doc.unsqueeze(2) == k_doc.unsqueeze(1)
    if causal:
        allowed = allowed & causal_mask(q_doc.shape[1], k_doc.shape[1], q_doc.device)
    return allowed.unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# Attention


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    *,
    position_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Materialised attention: explicit scores, boolean mask, softmax in fp32.

    q `(B, Tq, H, D)`, k/v `(B, Tk, Hkv, D)` with `H % Hkv == 0` (GQA: K/V heads repeated);
    returns `(B, Tq, H, D)` in q's dtype (a transposed view). Matmuls run in the inputs' dtype
    (pass fp32 inputs for an fp32 reference of low-precision ones). Which keys a query sees:
    - `causal`: keys up to its own position, queries being the last `Tq` of the `Tk` positions;
    - documents (needs `Tq == Tk`), from `cu_seqlens` (int32 offsets into the flattened `B*T`
      tokens, the kernel `flash_attention`'s convention) or from `position_ids` `(B, T)` (a
      document starts wherever a position is 0 and at every row start): only its own document;
    - `mask`: any extra boolean mask broadcastable to `(B, H, Tq, Tk)` (True = visible), e.g.
      from `attention_mask`; the model passes its precomputed mask here with `causal=False`.
    Scores are `q k^T / sqrt(D)`, or `q k^T * softmax_scale` when given. `dropout_p` drops
    attention probabilities (training). A query that sees no key gives NaN.
    """
    batch, q_len, n_heads, head_dim = q.shape
    k_len = k.shape[1]
    if cu_seqlens is not None and position_ids is not None:
        raise ValueError("attention_reference: give documents as cu_seqlens or position_ids, not both")
    doc = None
    if cu_seqlens is not None:
        doc = document_ids_from_cu_seqlens(cu_seqlens.to(q.device), batch, q_len)
    elif position_ids is not None:
        doc = document_ids(position_ids.to(q.device))
    if doc is not None:
        if q_len != k_len:
            raise ValueError(f"attention_reference: documents need q and k of one length, got {q_len} and {k_len}")
        allowed = attention_mask(doc, doc, causal)
    elif causal:
        allowed = causal_mask(q_len, k_len, q.device)
    else:
        allowed = None
    if mask is not None:
        allowed = mask if allowed is None else allowed & mask

    rep = n_heads // k.shape[2]
    qt = q.transpose(1, 2)  # (B, H, T, D)
    kt = k.repeat_interleave(rep, dim=2).transpose(1, 2)
    vt = v.repeat_interleave(rep, dim=2).transpose(1, 2)
    scores = qt @ kt.transpose(-2, -1)
    scores = scores / math.sqrt(head_dim) if softmax_scale is None else scores * softmax_scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return (probs @ vt).transpose(1, 2)

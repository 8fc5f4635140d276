"""The llmcore model: a Llama-style pre-norm decoder (dense or MoE) in one readable file.

Layout of one block (MiniMind2 / Llama):  x + Attn(RMSNorm(x))  ->  h + MLP(RMSNorm(h)).
Attention is grouped-query with rotary embeddings (theta 1e6, optional YaRN), the MLP is SwiGLU
(or a mixture of SwiGLU experts), and the output projection is tied to the token embedding.

Backends: `eager` runs the plain-PyTorch ops of `llmcore.reference` (the same functions the
Triton kernels are tested against), `sdpa` the same with PyTorch's fused attention, and `triton`
the kernels of `llmcore.kernels` (imported only when that backend runs; with `qk_norm` the
QK-norm and RoPE run as one fused kernel, `qk_norm_rope`).

Packed rows: a new document begins wherever `position_ids == 0` (and at every row start). Tokens
attend only inside their own document, causally. The eager and sdpa backends turn that rule into
a block-diagonal causal mask; the triton backend hands the flash attention kernel each token's
document bounds, computed once per forward with fixed shapes (not `cu_seqlens`, whose
data-dependent length would break a torch.compile graph). Rows that are single documents
(`position_ids` None, or a CPU tensor with no 0 after the row start) get no mask and no bounds:
plain causal attention (SDPA's `is_causal`, the kernel's unmasked tiles). Nothing in a forward
reads tensor data on the host on CUDA (no `.item()`/`.tolist()`): MoE routing in bf16 runs as
grouped GEMMs with device-side offsets. The KV cache remembers each cached
token's document id, so the same rule holds while decoding (generation uses it to hide left
padding: each pad token is its own document). With a KV cache (generation) the triton backend
keeps its RMSNorm and RoPE kernels but runs attention through SDPA with the cache's document
mask: our flash-attention kernel has no decode (KV-cache) variant, and one query token per step
is not where flash attention pays.

Parameter names follow Hugging Face Llama (`layers.N.self_attn.q_proj.weight`, ...) so export to
`LlamaForCausalLM` is a prefix change.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmcore.errors import LLMCoreError
from llmcore.reference import (
    apply_rope_rows,
    attention_mask,
    attention_reference,
    causal_mask,
    document_ids,
    rms_norm_reference,
    rope_rows,
    rope_tables,
)

BACKENDS = ("eager", "sdpa", "triton")


def _mlp_hidden(hidden_size: int) -> int:
    # SwiGLU keeps the parameter count of a 4d MLP with 8d/3, rounded up to a multiple of 64.
    return 64 * math.ceil(8 * hidden_size / 3 / 64)


@dataclass
class ModelConfig:
    """Everything that fixes the architecture (and the attention backend, which does not change weights)."""

    vocab_size: int = 6400
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    intermediate_size: int | None = None  # None: 64 * ceil(8 * hidden_size / 3 / 64)
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    # YaRN, as MiniMind's `rope_scaling`: {"type": "yarn", "factor", "original_max_position_embeddings",
    # "beta_fast", "beta_slow", "attention_factor"}; None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    attn_backend: str = "sdpa"
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # Mixture of experts (ignored unless use_moe).
    use_moe: bool = False
    num_experts: int = 4
    num_shared_experts: int = 1
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # None: intermediate_size
    norm_topk_prob: bool = True
    aux_loss_coef: float = 0.1
    # Qwen3 / MiniMind-3 QK-norm: RMSNorm over head_dim (one weight of head_dim per layer for q and
    # one for k, eps = rms_norm_eps) on q and k after their projections, before RoPE.
    qk_norm: bool = False

    def __post_init__(self) -> None:
        # Types and ranges first, before anything derives from them or any module is built: a
        # model_config.json saying `num_hidden_layers: 100000000` is refused here, not by the OOM killer.
        _check_fields(self)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = _mlp_hidden(self.hidden_size)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.attn_backend not in BACKENDS:
            raise LLMCoreError(f"attn_backend must be one of {', '.join(BACKENDS)}, got {self.attn_backend!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise LLMCoreError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise LLMCoreError("head_dim must be even for rotary embeddings")
        if not self.tie_word_embeddings:
            raise LLMCoreError("only tied input/output embeddings are supported (tie_word_embeddings=True)")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise LLMCoreError("num_experts_per_tok must be between 1 and num_experts")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset (`tiny`, `demo`, `minimind2-small`, `minimind2`, `minimind2-moe`, `minimind-3`,
        `minimind-3-moe`) with fields overridden."""
        if name not in PRESETS:
            raise LLMCoreError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; `from_dict(to_dict())` gives an equal config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from `to_dict()` output; unknown keys are refused so a typo never silently changes a model.

        Keys that older versions wrote and that no longer mean anything (`extra`) are dropped.
        """
        d = {k: v for k, v in d.items() if k not in _RETIRED_KEYS}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LLMCoreError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)


# Sane upper limits per integer field (a few times the largest public models' values). They exist so a
# corrupt or hostile model_config.json fails in microseconds instead of allocating until memory runs out.
_INT_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 2**20),
    "hidden_size": (1, 65536),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (2, 1024),
    "intermediate_size": (1, 2**20),
    "max_position_embeddings": (1, 2**20),
    "bos_token_id": (0, 2**20),
    "eos_token_id": (0, 2**20),
    "pad_token_id": (0, 2**20),
    "num_experts": (1, 1024),
    "num_shared_experts": (0, 1024),
    "num_experts_per_tok": (1, 1024),
    "moe_intermediate_size": (1, 2**20),
}
_OPTIONAL_INTS = frozenset({"head_dim", "intermediate_size", "moe_intermediate_size"})
_MAX_PARAMS = 1e12
# Float fields: (lowest allowed, highest allowed, lowest is exclusive).
_FLOAT_LIMITS: dict[str, tuple[float, float, bool]] = {
    "rope_theta": (0.0, 1e12, True),
    "rms_norm_eps": (0.0, 1.0, True),
    "dropout": (0.0, 1.0, False),
    "initializer_range": (0.0, 10.0, False),
    "aux_loss_coef": (0.0, 1e3, False),
}
_BOOLS = ("tie_word_embeddings", "use_moe", "norm_topk_prob", "qk_norm")
_ROPE_SCALING_NUMBERS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor")


def _check_fields(cfg: "ModelConfig") -> None:
    """Refuse a wrong type or an out-of-range value in any field with one line naming the field."""
    for name, (lo, hi) in _INT_LIMITS.items():
        value = getattr(cfg, name)
        if value is None and name in _OPTIONAL_INTS:
            continue
        # bool is an int subclass; `true` for a layer count is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise LLMCoreError(f"model config: {name} must be an integer, got {value!r}")
        if not lo <= value <= hi:
            raise LLMCoreError(f"model config: {name} must be between {lo} and {hi}, got {value}")
    for name, (lo, hi, lo_open) in _FLOAT_LIMITS.items():
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LLMCoreError(f"model config: {name} must be a finite number, got {value!r}")
        if value < lo or (lo_open and value == lo) or value > hi:
            side = ">" if lo_open else ">="
            raise LLMCoreError(f"model config: {name} must be {side} {lo} and <= {hi}, got {value}")
    for name in _BOOLS:
        if not isinstance(getattr(cfg, name), bool):
            raise LLMCoreError(f"model config: {name} must be true or false, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.attn_backend, str):
        raise LLMCoreError(f"model config: attn_backend must be a string, got {cfg.attn_backend!r}")
    # Each field can be in range while their product is not buildable (65536 wide x 1024 layers):
    # a rough count, refused far above anything llmcore can train (it only has to be cheap).
    head_dim = cfg.head_dim or max(cfg.hidden_size // cfg.num_attention_heads, 1)
    mlp = cfg.intermediate_size or _mlp_hidden(cfg.hidden_size)
    experts = cfg.num_experts + cfg.num_shared_experts if cfg.use_moe else 1
    estimate = cfg.vocab_size * cfg.hidden_size + cfg.num_hidden_layers * cfg.hidden_size * (
        2 * (cfg.num_attention_heads + cfg.num_key_value_heads) * head_dim
        + 3 * experts * ((cfg.moe_intermediate_size or mlp) if cfg.use_moe else mlp)
    )
    if estimate > _MAX_PARAMS:
        raise LLMCoreError(
            f"model config: about {estimate:.2e} parameters (num_hidden_layers, hidden_size, "
            f"intermediate_size, ...), more than the {_MAX_PARAMS:.0e} llmcore builds"
        )
    scaling = cfg.rope_scaling
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise LLMCoreError(f"model config: rope_scaling must be an object or null, got {scaling!r}")
        for key in _ROPE_SCALING_NUMBERS:
            value = scaling.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
                raise LLMCoreError(f"model config: rope_scaling.{key} must be a positive number, got {value!r}")


# Config keys written by older versions, ignored on load: `extra` (free-form notes, never read).
_RETIRED_KEYS = frozenset({"extra"})

_MINIMIND3: dict[str, Any] = dict(
    hidden_size=768,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=96,
    intermediate_size=2432,
    qk_norm=True,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    vocab_size=6400,
    tie_word_embeddings=True,
)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024
    ),
    # Sized for `make demo`: learns visibly in a few CPU minutes (~2.4M parameters at vocab 4096).
    "demo": dict(
        hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048
    ),
    "minimind2-small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2),
    "minimind2": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2),
    "minimind2-moe": dict(
        hidden_size=640,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        use_moe=True,
        num_experts=4,
        num_shared_experts=1,
        num_experts_per_tok=2,
    ),
    # MiniMind-3 (Qwen3-style): QK-norm, head_dim 96, MLP ceil(768*pi/64)*64 = 2432, eps 1e-6.
    # 63,912,192 parameters, MiniMind's own count.
    "minimind-3": dict(_MINIMIND3),
    # The same with 4 routed SwiGLU experts of the dense MLP's size, top-1, no shared expert
    # (MiniMind-3's MOEFeedForward): 198,416,640 parameters.
    "minimind-3-moe": dict(
        _MINIMIND3,
        use_moe=True,
        num_experts=4,
        num_experts_per_tok=1,
        norm_topk_prob=True,
        num_shared_experts=0,
        moe_intermediate_size=2432,
        aux_loss_coef=5e-4,
    ),
}


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V), float
    aux_loss: torch.Tensor  # scalar; MoE load-balancing loss already scaled by aux_loss_coef, 0 for dense
    kv_cache: "KVCache | None"


class KVCache:
    """Preallocated per-layer K/V (B, max_len, Hkv, D) plus each cached token's document id and position.

    Filled in place by `LLM.forward`; `length` counts the cached tokens (same for every row).
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, max_len, config.num_key_value_heads, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.doc = torch.zeros(batch_size, max_len, device=device, dtype=torch.long)
        self.next_pos = torch.zeros(batch_size, device=device, dtype=torch.long)
        self.length = 0
        self.max_len = max_len

    def reset(self) -> None:
        self.length = 0
        self.next_pos.zero_()


# ----------------------------------------------------------------------------------------------
# Layers


def _single_documents(position_ids: torch.Tensor) -> bool:
    """True when every row is one document (no position 0 after the row start), decided only where
    that costs no host sync: a CPU tensor (the loader's, before it moves to the GPU) outside
    torch.compile. Elsewhere False: the rows are treated as packed, which is always correct."""
    if position_ids.device.type != "cpu" or torch.compiler.is_compiling() or position_ids.dim() != 2:
        return False
    return bool((position_ids[:, 1:] != 0).all())


def _sdpa_wants_causal_mask(device: torch.device) -> bool:
    """On CPU, SDPA's is_causal path with enable_gqa is ~3x slower in backward than the same
    attention with an explicit causal mask (torch 2.13), so it gets the mask there; elsewhere
    is_causal (no mask), which lets PyTorch pick its flash kernel."""
    return device.type == "cpu"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, backend: str) -> None:
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            from llmcore.kernels import rms_norm

            return rms_norm(x, self.weight, self.eps)
        # Normalised in fp32 so bf16 activations keep their precision (as Llama/MiniMind do).
        return rms_norm_reference(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.backend = cfg.attn_backend
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.eps = cfg.rms_norm_eps
        if cfg.qk_norm:
            # HF Qwen3 names (self_attn.q_norm.weight / k_norm.weight): one head_dim weight shared by all heads.
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.attn_backend)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.attn_backend)
        self.qk_norm = cfg.qk_norm

    def forward(
        self, x: torch.Tensor, rope: dict[str, Any], attn: dict[str, Any], layer: int, kv_cache: KVCache | None
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
        # Under DeepSpeed ZeRO-3 (parameters carry `ds_id`) a norm's weight is gathered only when its
        # own module runs, so the fused kernel, which reads the weights directly, is not used there.
        if rope["kernel"] and self.qk_norm and not hasattr(self.q_norm.weight, "ds_id"):
            from llmcore.kernels import qk_norm_rope

            # One fused pass (normalise, scale, rotate) instead of two norms and a rotation.
            q, k = qk_norm_rope(
                q,
                k,
                self.q_norm.weight,
                self.k_norm.weight,
                rope["cos_table"],
                rope["sin_table"],
                rope["position_ids"],
                self.eps,
            )
        else:
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            if rope["kernel"]:
                from llmcore.kernels import apply_rope

                q, k = apply_rope(q, k, rope["cos_table"], rope["sin_table"], rope["position_ids"])
            else:
                q, k = apply_rope_rows(q, k, rope["cos_rows"], rope["sin_rows"])

        if kv_cache is not None:
            start = kv_cache.length
            kv_cache.k[layer][:, start : start + t] = k
            kv_cache.v[layer][:, start : start + t] = v
            k = kv_cache.k[layer][:, : start + t]
            v = kv_cache.v[layer][:, : start + t]

        p = self.dropout if self.training else 0.0
        mode = attn["mode"]
        if mode == "flash":
            from llmcore.kernels import flash_attention

            # Document bounds computed once per forward; None: every row is one causal document.
            out = flash_attention(q, k, v, causal=True, doc_bounds=attn.get("bounds"))
        elif mode == "eager":
            mask = attn["mask"]  # None: plain causal rows
            out = attention_reference(q, k, v, causal=mask is None, mask=mask, dropout_p=p)
        else:
            # (B, H, T, D) layout for SDPA; enable_gqa lets it broadcast K/V heads without a copy.
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=attn["mask"],
                is_causal=attn["mask"] is None,
                dropout_p=p,
                enable_gqa=self.n_kv != self.n_heads,
            ).transpose(1, 2)
        out = out.reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# Token groups of a grouped GEMM are padded to this many rows: the weight-gradient GEMM of
# `torch.nn.functional.grouped_mm` contracts over the tokens of a group, whose bf16 rows must
# start 16-byte aligned (8 elements), or CUDA asserts (torchtitan's TOKEN_GROUP_ALIGN_SIZE_M).
_GROUP_ALIGN = 8


def _grouped_mm_device(device_type: str, index: int) -> bool:
    """Whether `grouped_mm` runs on this device: CPU (torch >= 2.9), or CUDA from sm_80 on."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device_type == "cuda":
        return torch.cuda.get_device_capability(index)[0] >= 8
    return device_type == "cpu"


# A constant for torch.compile (it never traces the device query). This is all that
# `torch.compiler.assume_constant_result` does (torch/_dynamo/decorators.py); set here directly
# because calling it imports torch._dynamo, and with it Triton, into every `import llmcore.model`.
_grouped_mm_device._dynamo_marked_constant = True  # type: ignore[attr-defined]


class MoE(nn.Module):
    """Routed top-k SwiGLU experts plus always-on shared experts, with a load-balancing loss.

    Assignments are sorted by expert so every expert runs once on one contiguous slice (a loop over
    experts, never over tokens). In bf16 (the GPU training dtype, also under bf16 autocast) with
    16-byte-aligned sizes, all experts run as three grouped GEMMs (`F.grouped_mm`) whose group
    offsets stay on the device: no host sync and no data-dependent shape, so torch.compile keeps
    one graph. Each expert's rows are padded to a multiple of 8 inside a buffer of fixed size
    (N*k + 8*E); padding rows are zero, their outputs never read. Other dtypes split the sorted
    rows by per-expert counts read on the host (one sync per layer; a graph break under compile).
    Counts come from `index_add` (not `bincount`/`one_hot`, which read the data on CUDA).

    The aux loss is E * sum_i f_i * P_i (f_i: share of routed assignments to expert i, P_i: mean
    router probability), which equals 1 when routing is uniform and grows as it concentrates;
    scaled by aux_loss_coef. At top-1 this is MiniMind-3's formula exactly.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.norm_topk, self.coef = cfg.norm_topk_prob, cfg.aux_loss_coef
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        self.shared_experts = nn.ModuleList(
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_shared_experts)
        )
        # 16-byte rows for bf16 operands of the grouped GEMMs.
        self.aligned = cfg.hidden_size % 8 == 0 and cfg.moe_intermediate_size % 8 == 0

    def route(self, x_flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities (N, E), top-k weights (N, k) and expert ids (N, k)."""
        probs = F.softmax(self.gate(x_flat).float(), dim=-1)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            # Also at top-1 (weight 1), as MiniMind-3 and HF Qwen3-MoE do.
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return probs, weights, idx

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def use_grouped(self, x: torch.Tensor) -> bool:
        """True when the experts run as sync-free grouped GEMMs (see the class docstring).

        Not under DeepSpeed ZeRO-3 (parameters carry `ds_id`): there an expert's weights are
        gathered only when its own module runs, and the grouped path reads them directly.
        """
        return (
            self.aligned
            and self._compute_dtype(x) == torch.bfloat16
            and not hasattr(self.experts[0].gate_proj.weight, "ds_id")
            and _grouped_mm_device(x.device.type, x.device.index or 0)
        )

    def _experts_grouped(self, xs: torch.Tensor, sorted_expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """All routed experts on the expert-sorted rows `xs` in three grouped GEMMs (bf16)."""
        n, d = xs.shape
        dtype = torch.bfloat16
        padded = (counts + _GROUP_ALIGN - 1) // _GROUP_ALIGN * _GROUP_ALIGN
        ends = padded.cumsum(0)
        # Row of each sorted assignment in the padded buffer: its group's padded start + its rank in the group.
        rank = torch.arange(n, device=xs.device) - (counts.cumsum(0) - counts)[sorted_expert]
        dest = (ends - padded)[sorted_expert] + rank
        rows = n + _GROUP_ALIGN * self.n_experts  # a fixed bound of sum(padded)
        # index_copy: the padding rows are zeros and send no gradient back to x.
        buf = xs.new_zeros((rows, d), dtype=dtype).index_copy(0, dest, xs.to(dtype))
        offs = ends.to(torch.int32)
        gate_up = torch.stack([torch.cat((e.gate_proj.weight, e.up_proj.weight)) for e in self.experts]).to(dtype)
        down = torch.stack([e.down_proj.weight for e in self.experts]).to(dtype)
        gate, up = F.grouped_mm(buf, gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        out = F.grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)
        return out.index_select(0, dest)

    def _experts_split(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """All routed experts on the expert-sorted rows `xs`, one slice each (sizes read on the host)."""
        outs = [expert(chunk) for expert, chunk in zip(self.experts, xs.split(counts.tolist(), dim=0))]
        return torch.cat(outs, dim=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        x_flat = x.reshape(-1, d)
        probs, weights, idx = self.route(x_flat)

        flat_idx = idx.reshape(-1)  # (N*k,) expert of each assignment
        order = flat_idx.argsort(stable=True)
        token_of = order // self.top_k  # token index of each sorted assignment
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).index_add_(
            0, flat_idx, torch.ones_like(flat_idx)
        )
        xs = x_flat.index_select(0, token_of)
        if self.use_grouped(x):
            ys = self._experts_grouped(xs, flat_idx[order], counts)
        else:
            ys = self._experts_split(xs, counts)
        ys = ys.to(x.dtype) * weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
        y = torch.zeros_like(x_flat).index_add(0, token_of, ys)
        for shared in self.shared_experts:
            y = y + shared(x_flat)

        share = counts.float() / flat_idx.numel()  # f_i (sums to 1)
        aux = self.n_experts * (share * probs.mean(0)).sum() * self.coef
        return y.view(b, t, d), aux


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        norm_backend = cfg.attn_backend
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, norm_backend)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, norm_backend)
        self.mlp: nn.Module = MoE(cfg) if cfg.use_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, rope: dict[str, Any], attn: dict[str, Any], layer: int, kv_cache: KVCache | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), rope, attn, layer, kv_cache))
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            m, aux = self.mlp(h)
        else:
            m, aux = self.mlp(h), None
        return x + self.dropout(m), aux


class LLM(nn.Module):
    """Decoder-only language model; see the module docstring for the packing and cache rules."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.attn_backend)
        cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.embed_tokens.weight.is_meta:
            # Built on the meta device to receive loaded weights: random init would be thrown away,
            # and nn.init on meta tensors costs seconds of torch._dynamo import.
            return
        self.apply(self._init_weights)
        # GPT-2 style: shrink the residual-branch outputs so the residual stream does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=config.initializer_range / math.sqrt(2 * config.num_hidden_layers))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "LLM":
        # Keep the RoPE tables in fp32 when the weights are cast to bf16/fp16: positions up to 32k
        # need the precision, and the rotation itself runs in fp32.
        cos, sin = self.rope_cos, self.rope_sin
        super()._apply(fn, *args, **kwargs)
        if self.rope_cos.dtype != torch.float32:
            self.rope_cos = cos.to(self.rope_cos.device, torch.float32)
            self.rope_sin = sin.to(self.rope_sin.device, torch.float32)
        return self

    def set_attn_backend(self, backend: str) -> "LLM":
        """Switch eager/sdpa/triton in place (weights are the same for all three)."""
        if backend not in BACKENDS:
            raise LLMCoreError(f"attn_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.config.attn_backend = backend
        for module in self.modules():
            if isinstance(module, (Attention, RMSNorm)):
                module.backend = backend
        return self

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache on the model's device and dtype."""
        w = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, device=w.device, dtype=w.dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> ModelOutput:
        b, t = input_ids.shape
        backend = self.config.attn_backend
        start = kv_cache.length if kv_cache is not None else 0
        if kv_cache is not None and start + t > kv_cache.max_len:
            raise LLMCoreError(f"KV cache full: {start} cached + {t} new tokens > max_len {kv_cache.max_len}")

        # Documents matter only where some row holds more than one; otherwise attention is plainly
        # causal (no mask for SDPA, so PyTorch may pick its flash kernel; no bounds for ours).
        explicit_positions = position_ids is not None and not _single_documents(position_ids)
        if position_ids is None:
            if kv_cache is not None and start > 0:
                position_ids = kv_cache.next_pos.unsqueeze(1) + torch.arange(t, device=input_ids.device)
            else:
                position_ids = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
        position_ids = position_ids.to(input_ids.device)

        # Attention plan: which implementation and what mask, computed once for all layers.
        attn: dict[str, Any] = {"mode": "sdpa" if backend == "triton" else backend, "mask": None}
        if kv_cache is not None:
            # Documents continue across calls: the first new token starts a document only if its position is 0.
            prev = (
                kv_cache.doc[:, start - 1 : start]
                if start > 0
                else torch.zeros(b, 1, dtype=torch.long, device=input_ids.device)
            )
            doc = prev + document_ids(position_ids, first_is_start=start == 0)
            kv_cache.doc[:, start : start + t] = doc
            attn["mask"] = attention_mask(doc, kv_cache.doc[:, : start + t])
            kv_cache.next_pos = position_ids[:, -1] + 1
        elif backend == "triton":
            attn["mode"] = "flash"
            if explicit_positions:
                from llmcore.kernels import document_bounds

                # Once per forward for all layers (fixed shapes: one graph under torch.compile).
                attn["bounds"] = document_bounds(position_ids)
        elif explicit_positions:
            doc = document_ids(position_ids)
            attn["mask"] = attention_mask(doc, doc)
        elif backend == "sdpa" and _sdpa_wants_causal_mask(input_ids.device):
            attn["mask"] = causal_mask(t, t, input_ids.device)
        # else: plain causal rows (mask None -> is_causal fast path / tril in eager)

        rope: dict[str, Any] = {"kernel": backend == "triton"}
        if rope["kernel"]:
            rope.update(cos_table=self.rope_cos, sin_table=self.rope_sin, position_ids=position_ids)
        else:
            # Table rows gathered once per forward, shared by all layers.
            cos_rows, sin_rows = rope_rows(self.rope_cos, self.rope_sin, position_ids)
            rope.update(cos_rows=cos_rows, sin_rows=sin_rows)

        h = self.dropout(self.embed_tokens(input_ids))
        aux_total = h.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.layers):
            h, aux = block(h, rope, attn, i, kv_cache)
            if aux is not None:
                aux_total = aux_total + aux
        if kv_cache is not None:
            kv_cache.length = start + t
        h = self.norm(h)
        logits = F.linear(h, self.embed_tokens.weight).float()
        return ModelOutput(logits=logits, aux_loss=aux_total, kv_cache=kv_cache)


def unwrap_model(model: nn.Module) -> LLM:
    """The `LLM` inside any nesting of wrappers: torch.compile (`_orig_mod`), DDP and DeepSpeed (`.module`)."""
    inner = model
    while not isinstance(inner, LLM):
        wrapped = getattr(inner, "_orig_mod", None)
        if wrapped is None:
            wrapped = getattr(inner, "module", None)
        if not isinstance(wrapped, nn.Module):
            raise TypeError(
                f"unwrap_model: {type(model).__name__} holds no llmcore LLM (stopped at {type(inner).__name__})"
            )
        inner = wrapped
    return inner


# ----------------------------------------------------------------------------------------------
# Parameter accounting (for `llmcore model info`)


def param_report(config: ModelConfig) -> dict[str, Any]:
    """Total, embedding, per-block, and (MoE) active-per-token parameter counts, without allocating weights."""
    with torch.device("meta"):
        model = LLM(config)
    total = model.num_params()
    embedding = model.embed_tokens.weight.numel()
    block = model.layers[0]
    per_block = sum(p.numel() for p in block.parameters())
    attn = sum(p.numel() for p in block.self_attn.parameters())
    mlp = sum(p.numel() for p in block.mlp.parameters())
    norms = per_block - attn - mlp
    report: dict[str, Any] = {
        "total": total,
        "embedding": embedding,
        "per_block": per_block,
        "attention_per_block": attn,
        "mlp_per_block": mlp,
        "norms_per_block": norms,
        "final_norm": model.norm.weight.numel(),
        "blocks": config.num_hidden_layers,
    }
    if config.use_moe:
        expert = sum(p.numel() for p in block.mlp.experts[0].parameters())
        inactive = (config.num_experts - config.num_experts_per_tok) * expert * config.num_hidden_layers
        report.update(expert=expert, router=block.mlp.gate.weight.numel(), active_per_token=total - inactive)
    else:
        report["active_per_token"] = total
    return report

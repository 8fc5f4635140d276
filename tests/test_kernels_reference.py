"""llmcore.reference: one plain-PyTorch copy shared by the model's eager path and the kernel tests.

Checks that it is shared (the kernels re-export it, the eager model calls it, it imports no
Triton), and the reference's own behaviour against independent formulas and PyTorch's SDPA.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import llmcore.model as model_mod
from llmcore import kernels, reference
from llmcore.model import LLM, ModelConfig


def test_reference_and_model_import_no_triton():
    code = (
        "import sys\nimport llmcore.reference, llmcore.model, llmcore.checkpoint\n"
        "print('TRITON' if 'triton' in sys.modules else 'CLEAN')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "CLEAN", out.stdout + out.stderr


def test_kernels_reexport_the_one_reference():
    # The kernel tests compare against exactly the functions the eager model runs.
    assert kernels.rms_norm_reference is reference.rms_norm_reference is model_mod.rms_norm_reference
    assert kernels.apply_rope_reference is reference.apply_rope_reference
    assert kernels.flash_attention_reference is reference.attention_reference is model_mod.attention_reference
    assert kernels.rope_tables is reference.rope_tables is model_mod.rope_tables
    assert kernels.cu_seqlens_from_position_ids is reference.cu_seqlens_from_position_ids
    assert model_mod.document_ids is reference.document_ids
    from llmcore.kernels import rope as rope_mod

    assert rope_mod.rotate_half is reference.rotate_half
    assert reference.apply_rope_reference.__module__ == "llmcore.reference"


def test_eager_model_runs_the_reference(monkeypatch):
    calls = {"attention": 0, "rms_norm": 0, "rope": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(model_mod, "attention_reference", counted("attention", reference.attention_reference))
    monkeypatch.setattr(model_mod, "rms_norm_reference", counted("rms_norm", reference.rms_norm_reference))
    monkeypatch.setattr(model_mod, "apply_rope_rows", counted("rope", reference.apply_rope_rows))
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", attn_backend="eager")
    LLM(cfg)(torch.randint(3, 100, (2, 7)))
    layers = cfg.num_hidden_layers
    assert calls == {"attention": layers, "rms_norm": 2 * layers + 1, "rope": layers}
    # sdpa shares the norm and RoPE but not the attention.
    calls.update(attention=0, rms_norm=0, rope=0)
    LLM(ModelConfig.from_preset("tiny", attn_backend="sdpa"))(torch.randint(3, 100, (2, 7)))
    assert calls == {"attention": 0, "rms_norm": 2 * layers + 1, "rope": layers}


# ---------------------------------------------------------------- RoPE


def test_rope_tables_signature_and_yarn():
    cos, sin = reference.rope_tables(16, 40)  # head_dim, max_positions
    assert cos.shape == sin.shape == (40, 16) and cos.dtype == torch.float32
    torch.testing.assert_close(cos[:, :8], cos[:, 8:], atol=0, rtol=0)  # each half repeated
    assert float(sin[5, 0]) == pytest.approx(torch.tensor(5.0).sin().item(), abs=1e-7)
    # YaRN below its original length changes nothing but the attention factor.
    c2, _ = reference.rope_tables(
        16, 40, scaling={"type": "yarn", "original_max_position_embeddings": 64, "attention_factor": 0.5}
    )
    torch.testing.assert_close(c2, cos * 0.5, atol=1e-7, rtol=0)


def test_apply_rope_rows_equals_reference_with_tables():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 13, 4, 32, generator=gen), torch.randn(3, 13, 2, 32, generator=gen)
    cos, sin = reference.rope_tables(32, 50)
    pos = torch.randint(0, 50, (3, 13), generator=gen)
    rows = reference.rope_rows(cos, sin, pos)
    assert rows[0].shape == (3, 13, 1, 32)
    for a, b in zip(reference.apply_rope_rows(q, k, *rows), reference.apply_rope_reference(q, k, cos, sin, pos)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    default = reference.apply_rope_reference(q, k, cos, sin)
    explicit = reference.apply_rope_reference(q, k, cos, sin, torch.arange(13).expand(3, 13))
    torch.testing.assert_close(default[0], explicit[0], atol=0, rtol=0)


def test_rotate_half():
    x = torch.arange(6.0).view(1, 6)
    assert reference.rotate_half(x).tolist() == [[-3.0, -4.0, -5.0, 0.0, 1.0, 2.0]]


# ---------------------------------------------------------------- RMSNorm


def test_rms_norm_reference_dtypes():
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(5, 37, generator=gen), torch.randn(37, generator=gen)
    expected = x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * w
    torch.testing.assert_close(reference.rms_norm_reference(x, w), expected, atol=1e-6, rtol=1e-5)
    assert reference.rms_norm_reference(x.bfloat16(), w.bfloat16()).dtype == torch.bfloat16
    # fp32 weight on bf16 activations: the HF module's promotion (the eager model relies on it).
    assert reference.rms_norm_reference(x.bfloat16(), w).dtype == torch.float32


# ---------------------------------------------------------------- documents and masks


def test_document_ids_and_cu_seqlens_agree():
    pos = torch.tensor([[3, 4, 0, 1, 2, 0, 1], [0, 1, 2, 3, 0, 0, 1]])
    doc = reference.document_ids(pos)
    assert doc.tolist() == [[1, 1, 2, 2, 2, 3, 3], [1, 1, 1, 1, 2, 3, 3]]
    assert reference.document_ids(pos, first_is_start=False).tolist()[0] == [0, 0, 1, 1, 1, 2, 2]
    cu = reference.cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 2, 5, 7, 11, 12, 14] and cu.dtype == torch.int32
    from_cu = reference.document_ids_from_cu_seqlens(cu, 2, 7)
    # Same partition (ids from cu_seqlens are global, not per row).
    same_doc = lambda d: d.unsqueeze(2) == d.unsqueeze(1)  # noqa: E731
    assert torch.equal(same_doc(doc), same_doc(from_cu))


def test_attention_mask_causal_offset_and_documents():
    doc = torch.tensor([[1, 1, 2, 2]])
    mask = reference.attention_mask(doc, doc)
    assert mask.shape == (1, 1, 4, 4)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    # Queries are the last positions of the keys (a KV cache holds the earlier ones).
    assert reference.causal_mask(2, 4).int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    last = reference.attention_mask(doc[:, 2:], doc)
    torch.testing.assert_close(last, mask[:, :, 2:], atol=0, rtol=0)


# ---------------------------------------------------------------- attention


def _qkv(batch, seq, heads, kv_heads, head_dim, seed, kv_seq=None):
    gen = torch.Generator().manual_seed(seed)
    kv_seq = kv_seq or seq
    return (
        torch.randn(batch, seq, heads, head_dim, generator=gen),
        torch.randn(batch, kv_seq, kv_heads, head_dim, generator=gen),
        torch.randn(batch, kv_seq, kv_heads, head_dim, generator=gen),
    )


def _sdpa(q, k, v, mask=None, is_causal=False, scale=None):
    return F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    ).transpose(1, 2)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_reference_documents_match_sdpa(causal):
    # Odd sizes, GQA, packed documents given as position_ids and as cu_seqlens.
    q, k, v = _qkv(3, 37, 6, 2, 16, seed=3)
    pos = torch.cat([torch.arange(5), torch.arange(1), torch.arange(19), torch.arange(12)]).expand(3, 37).clone()
    pos[1] = torch.arange(37)
    doc = reference.document_ids(pos)
    expected = _sdpa(q, k, v, mask=reference.attention_mask(doc, doc, causal))
    by_pos = reference.attention_reference(q, k, v, causal=causal, position_ids=pos)
    by_cu = reference.attention_reference(
        q, k, v, causal=causal, cu_seqlens=reference.cu_seqlens_from_position_ids(pos)
    )
    torch.testing.assert_close(by_pos, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_cu, by_pos, atol=0, rtol=0)
    assert by_pos.shape == q.shape


def test_attention_reference_plain_causal_scale_and_cache_offset():
    q, k, v = _qkv(2, 29, 4, 1, 32, seed=4)
    torch.testing.assert_close(
        reference.attention_reference(q, k, v), _sdpa(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        reference.attention_reference(q, k, v, causal=False, softmax_scale=0.3),
        _sdpa(q, k, v, scale=0.3),
        atol=1e-5,
        rtol=1e-5,
    )
    # The last 3 queries against all 29 keys (decoding with a cache) = the last 3 rows of the full result.
    full = reference.attention_reference(q, k, v)
    tail = reference.attention_reference(q[:, -3:], k, v)
    torch.testing.assert_close(tail, full[:, -3:], atol=1e-6, rtol=1e-6)


def test_attention_reference_explicit_mask_and_errors():
    q, k, v = _qkv(1, 9, 2, 2, 16, seed=5)
    doc = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 3, 3]])
    mask = reference.attention_mask(doc, doc)
    torch.testing.assert_close(
        reference.attention_reference(q, k, v, causal=False, mask=mask),
        reference.attention_reference(q, k, v, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1]])),
        atol=0,
        rtol=0,
    )
    with pytest.raises(ValueError, match="not both"):
        reference.attention_reference(
            q,
            k,
            v,
            position_ids=torch.zeros(1, 9, dtype=torch.long),
            cu_seqlens=torch.tensor([0, 9], dtype=torch.int32),
        )
    q2, k2, v2 = _qkv(1, 3, 2, 2, 16, seed=6, kv_seq=9)
    with pytest.raises(ValueError, match="one length"):
        reference.attention_reference(q2, k2, v2, position_ids=torch.zeros(1, 3, dtype=torch.long))


def test_attention_reference_dropout_only_in_probabilities():
    q, k, v = _qkv(1, 8, 2, 1, 16, seed=7)
    torch.manual_seed(0)
    a = reference.attention_reference(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    b = reference.attention_reference(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - reference.attention_reference(q, k, v)).abs().max() > 1e-3

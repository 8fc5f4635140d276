"""Model: presets, config, backends agree, KV cache, packed documents, MoE, torch.compile."""

from __future__ import annotations

import importlib

import pytest
import torch

from llmcore.errors import LLMCoreError
from llmcore.model import LLM, ModelConfig, MoE, param_report, unwrap_model
from llmcore.reference import cu_seqlens_from_position_ids, document_ids, rope_tables


def tiny(seed: int = 0, **overrides) -> LLM:
    # A larger init than training uses, so logits (and greedy choices) differ clearly between tokens.
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny", initializer_range=0.2, **overrides)
    return LLM(cfg).eval()


def ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 6400, (b, t), generator=g)


# ---------------------------------------------------------------- presets and config


@pytest.mark.parametrize(
    "name,published", [("minimind2-small", 25.8e6), ("minimind2", 104e6), ("minimind2-moe", 145e6)]
)
def test_preset_param_counts_match_minimind(name: str, published: float) -> None:
    total = param_report(ModelConfig.from_preset(name))["total"]
    assert abs(total - published) / published < 0.01, total


def test_param_report_counts_real_parameters_and_moe_active() -> None:
    cfg = ModelConfig.from_preset("tiny", use_moe=True)
    r = param_report(cfg)
    model = LLM(cfg)
    assert r["total"] == sum(p.numel() for p in model.parameters())
    assert r["per_block"] * cfg.num_hidden_layers + r["embedding"] + r["final_norm"] == r["total"]
    # 4 routed experts, top-2 -> two experts per layer are idle for any token.
    assert r["active_per_token"] == r["total"] - 2 * r["expert"] * cfg.num_hidden_layers


def test_config_roundtrip_and_validation() -> None:
    cfg = ModelConfig.from_preset("minimind2-moe", attn_backend="eager")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.intermediate_size == 1728 and cfg.head_dim == 80
    assert ModelConfig.from_preset("minimind2-small").intermediate_size == 1408
    with pytest.raises(LLMCoreError):
        ModelConfig.from_preset("nope")
    with pytest.raises(LLMCoreError):
        ModelConfig.from_dict({**cfg.to_dict(), "hiden_size": 3})
    with pytest.raises(LLMCoreError):
        ModelConfig.from_preset("tiny", attn_backend="flash")


def test_old_config_with_retired_extra_key_loads() -> None:
    # Configs written before `extra` was removed carry it (empty or with notes); they still load.
    cfg = ModelConfig.from_preset("tiny")
    assert "extra" not in cfg.to_dict()
    assert ModelConfig.from_dict({**cfg.to_dict(), "extra": {"source": "minimind"}}) == cfg


def test_unwrap_model_through_compile_and_module_wrappers() -> None:
    model = tiny()

    class Wrapper(torch.nn.Module):  # DDP / DeepSpeed engine: the model is `.module`
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    assert unwrap_model(model) is model
    assert unwrap_model(torch.compile(model)) is model
    assert unwrap_model(Wrapper(model)) is model
    assert unwrap_model(torch.compile(Wrapper(torch.compile(model)))) is model
    with pytest.raises(TypeError, match="no llmcore LLM"):
        unwrap_model(Wrapper(torch.nn.Linear(2, 2)))


def test_yarn_scales_only_low_frequencies() -> None:
    plain_cos, plain_sin = rope_tables(64, 4096, 1e6)
    yarn_cos, yarn_sin = rope_tables(
        64,
        4096,
        1e6,
        {"type": "yarn", "factor": 16, "original_max_position_embeddings": 2048, "beta_fast": 32, "beta_slow": 1},
    )
    # The first (fastest) frequency is kept; the slowest is interpolated by the factor.
    assert torch.allclose(plain_cos[:, 0], yarn_cos[:, 0])
    assert not torch.allclose(plain_cos[:, 31], yarn_cos[:, 31])
    # angle of the slowest frequency at position 4000 (small, so asin is well conditioned)
    slow_plain = torch.asin(plain_sin[4000, 31].double()).item()
    slow_yarn = torch.asin(yarn_sin[4000, 31].double()).item()
    assert slow_yarn == pytest.approx(slow_plain / 16, rel=1e-3)


# ---------------------------------------------------------------- backends, cache, packing


def test_eager_and_sdpa_agree() -> None:
    model = tiny(attn_backend="eager")
    x = ids(2, 24)
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)
    ref, ref_packed = model(x).logits, model(x, position_ids=pos).logits
    model.set_attn_backend("sdpa")
    torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(x, position_ids=pos).logits, ref_packed, atol=1e-5, rtol=0)


def test_torch_compile_matches_eager() -> None:
    # The packed path (block-diagonal mask from position_ids) is the one training compiles.
    model = tiny(attn_backend="sdpa")
    x = ids(2, 16)
    pos = torch.cat([torch.arange(6), torch.arange(10)]).expand(2, 16)
    ref = model(x, position_ids=pos).logits
    compiled = torch.compile(model, backend="inductor", dynamic=False)
    torch.testing.assert_close(compiled(x, position_ids=pos).logits, ref, atol=1e-5, rtol=0)


def test_kv_cache_matches_full_forward_every_step() -> None:
    for backend in ("eager", "sdpa"):
        model = tiny(attn_backend=backend)
        x = ids(2, 14)
        full = model(x).logits
        cache = model.new_kv_cache(2, 14)
        # a prefill of 5 tokens, then one token per step
        pieces = [model(x[:, :5], kv_cache=cache).logits]
        for t in range(5, 14):
            pieces.append(model(x[:, t : t + 1], kv_cache=cache).logits)
        assert cache.length == 14
        # fp32, but prefill and decode multiply different shapes (other reduction orders): logits of
        # this large-init model differ by up to ~1e-5 depending on the BLAS threads.
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=3e-5, rtol=0)


def test_kv_cache_overflow_is_an_error() -> None:
    model = tiny()
    cache = model.new_kv_cache(1, 4)
    with pytest.raises(LLMCoreError):
        model(ids(1, 5), kv_cache=cache)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_packed_row_equals_documents_alone(backend: str) -> None:
    model = tiny(attn_backend=backend)
    a, b = ids(1, 9, seed=2), ids(1, 7, seed=3)
    row = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(9), torch.arange(7)]).unsqueeze(0)
    packed = model(row, position_ids=pos).logits
    torch.testing.assert_close(packed[:, :9], model(a).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[:, 9:], model(b).logits, atol=1e-5, rtol=0)
    # Without position_ids the second document would see the first: the mask really matters.
    assert (model(row).logits[:, 9:] - model(b).logits).abs().max() > 1e-3


def test_row_start_begins_a_document_even_mid_document_positions() -> None:
    # A row cut from the middle of a document has positions that do not start at 0 (the loader
    # restarts them, but the model must still treat the row start as a start).
    pos = torch.tensor([[3, 4, 0, 1, 2, 0]])
    assert document_ids(pos).tolist() == [[1, 1, 2, 2, 2, 3]]
    pos2 = torch.tensor([[0, 1, 2], [5, 0, 1]])
    assert cu_seqlens_from_position_ids(pos2).tolist() == [0, 3, 4, 6]
    assert cu_seqlens_from_position_ids(pos2).dtype == torch.int32


def test_bf16_cast_keeps_fp32_rope_tables() -> None:
    model = tiny().to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32 and model.embed_tokens.weight.dtype == torch.bfloat16
    assert model(ids(1, 4)).logits.dtype == torch.float32


def _kernels_ready() -> str | None:
    try:
        kernels = importlib.import_module("llmcore.kernels")
    except ImportError as err:  # pragma: no cover - depends on the kernels part
        return f"llmcore.kernels does not import: {err}"
    missing = [n for n in ("rms_norm", "apply_rope", "flash_attention") if not hasattr(kernels, n)]
    return f"llmcore.kernels lacks {', '.join(missing)} (kernels part not merged yet)" if missing else None


def test_triton_backend_matches_eager_packed() -> None:
    reason = _kernels_ready()
    if reason:
        pytest.skip(reason)
    model = tiny(attn_backend="eager")
    x = ids(2, 8)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]])
    ref = model(x, position_ids=pos).logits
    ref.square().mean().backward()
    ref_grad = model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    model.set_attn_backend("triton")
    out = model(x, position_ids=pos).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    out.square().mean().backward()
    torch.testing.assert_close(model.layers[0].self_attn.q_proj.weight.grad, ref_grad, atol=1e-4, rtol=1e-3)
    # Decoding with a cache under the triton backend (kernel RoPE, masked SDPA over the cache).
    with torch.no_grad():
        cache = model.new_kv_cache(2, 8)
        steps = [model(x[:, :5], position_ids=pos[:, :5], kv_cache=cache).logits]
        steps += [model(x[:, t : t + 1], position_ids=pos[:, t : t + 1], kv_cache=cache).logits for t in range(5, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), ref.detach(), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- MoE


def moe_layer(seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    return MoE(ModelConfig.from_preset("tiny", use_moe=True, num_experts=4, num_experts_per_tok=2))


def test_moe_output_equals_per_token_reference() -> None:
    layer = moe_layer()
    x = torch.randn(2, 5, 64)
    y, _ = layer(x)
    probs, weights, idx = layer.route(x.reshape(-1, 64))
    assert idx.shape == (10, 2) and (idx[:, 0] != idx[:, 1]).all()
    ref = []
    for n, tok in enumerate(x.reshape(-1, 64)):
        out = sum(layer.shared_experts[0](tok) for _ in range(1))
        for j in range(2):
            out = out + weights[n, j] * layer.experts[int(idx[n, j])](tok)
        ref.append(out)
    torch.testing.assert_close(y.reshape(-1, 64), torch.stack(ref), atol=1e-5, rtol=1e-5)
    # top-2 weights renormalised to sum to 1
    torch.testing.assert_close(weights.sum(-1), torch.ones(10))


def test_moe_aux_loss_minimal_when_uniform_and_grows_when_skewed() -> None:
    layer = moe_layer()
    coef = layer.coef
    x = torch.randn(4, 16, 64)
    with torch.no_grad():
        layer.gate.weight.zero_()  # uniform router probabilities
    _, aux_uniform = layer(x)
    # Uniform probabilities: E * sum(f_i * 1/E) = 1, the minimum of the Switch loss.
    assert aux_uniform.item() == pytest.approx(coef, rel=1e-5)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0] = 5.0  # every token prefers expert 0
    _, aux_skewed = layer(x.abs())
    assert aux_skewed.item() > 1.5 * coef


def test_moe_backpropagates_to_gate_and_experts() -> None:
    model = tiny(use_moe=True).train()
    x = ids(2, 12)
    out = model(x)
    assert out.aux_loss.item() > 0
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 6400), x[:, 1:].reshape(-1)) + out.aux_loss
    loss.backward()
    moe = model.layers[0].mlp
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert moe.shared_experts[0].up_proj.weight.grad.abs().sum() > 0
    used = sum(e.up_proj.weight.grad is not None and e.up_proj.weight.grad.abs().sum() > 0 for e in moe.experts)
    assert used >= 2
    # The aux loss alone also reaches the router (that is what balances it).
    model.zero_grad()
    model(x).aux_loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0


def test_moe_model_kv_cache_and_packing() -> None:
    model = tiny(use_moe=True)
    x = ids(1, 10)
    full = model(x).logits
    cache = model.new_kv_cache(1, 10)
    steps = [model(x[:, :4], kv_cache=cache).logits] + [
        model(x[:, t : t + 1], kv_cache=cache).logits for t in range(4, 10)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    pos = torch.cat([torch.arange(4), torch.arange(6)]).unsqueeze(0)
    torch.testing.assert_close(model(x, position_ids=pos).logits[:, 4:], model(x[:, 4:]).logits, atol=1e-5, rtol=0)

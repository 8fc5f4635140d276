"""The model's hot loop: document bounds once per forward (none for single-document rows), SDPA
without a mask for single-document rows, MoE routing without host reads (grouped GEMMs in bf16,
one torch.compile graph), and a dense aux loss that is a plain device tensor."""

from __future__ import annotations

import pytest
import torch

import llmcore.model as model_mod
from llmcore.model import LLM, ModelConfig, MoE

PACKED = [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], [5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 0, 1]]


def _ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 6400, (b, t), generator=torch.Generator().manual_seed(seed))


class _NoHostReads:
    """Fails the test on any `.item()`, `.tolist()` or `bincount` (reads of device data on the host)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def refuse(name: str):
            def call(*args, **kwargs):
                raise AssertionError(f"{name} called in the hot loop")

            return call

        for name in ("item", "tolist"):
            monkeypatch.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        monkeypatch.setattr(torch, "bincount", refuse("torch.bincount"))


# ---------------------------------------------------------------- attention plan


def test_flash_document_bounds_once_per_forward_and_none_for_single_documents(monkeypatch) -> None:
    pytest.importorskip("triton")
    import llmcore.kernels as K

    from _kernel_helpers import DEVICE

    calls = []
    real = K.document_bounds

    def counting(position_ids):
        calls.append(tuple(position_ids.shape))
        return real(position_ids)

    monkeypatch.setattr(K, "document_bounds", counting)
    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", num_hidden_layers=3, attn_backend="triton")).to(DEVICE)
    x = _ids(2, 12).to(DEVICE)
    packed = model(x, position_ids=torch.tensor(PACKED, device=DEVICE)).logits
    assert calls == [(2, 12)]  # one computation for three layers
    calls.clear()
    plain = model(x).logits
    arange = model(x, position_ids=torch.arange(12).expand(2, 12)).logits  # a CPU tensor: checked for free
    assert calls == []
    torch.testing.assert_close(arange, plain, atol=0, rtol=0)
    eager = model.set_attn_backend("eager")(x, position_ids=torch.tensor(PACKED, device=DEVICE)).logits
    torch.testing.assert_close(packed, eager, atol=1e-5, rtol=1e-5)


def test_sdpa_gets_no_mask_for_single_document_rows(monkeypatch) -> None:
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return real(*args, **kwargs)

    monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention", spy)
    # As on CUDA (on CPU the model gives SDPA an explicit causal mask: faster there in torch 2.13).
    monkeypatch.setattr(model_mod, "_sdpa_wants_causal_mask", lambda device: False)
    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", attn_backend="sdpa")).eval()
    x = _ids(2, 12)
    for pos in (None, torch.arange(12).expand(2, 12), torch.arange(3, 15).expand(2, 12)):
        seen.clear()
        model(x, position_ids=pos)
        assert seen and all(mask is None and causal for mask, causal in seen), pos
    seen.clear()
    model(x, position_ids=torch.tensor(PACKED))
    assert seen and all(mask is not None and mask.dtype == torch.bool and not causal for mask, causal in seen)


def test_eager_builds_no_document_mask_for_single_document_rows(monkeypatch) -> None:
    calls = []
    real = model_mod.attention_mask
    monkeypatch.setattr(model_mod, "attention_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", attn_backend="eager")).eval()
    x = _ids(2, 12)
    ref = model(x).logits
    torch.testing.assert_close(model(x, position_ids=torch.arange(12).expand(2, 12)).logits, ref, atol=0, rtol=0)
    assert calls == []
    model(x, position_ids=torch.tensor(PACKED))
    assert calls == [1]


# ---------------------------------------------------------------- MoE routing


def _moe(top_k: int = 2, shared: int = 1, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset(
        "tiny", use_moe=True, num_experts=4, num_experts_per_tok=top_k, num_shared_experts=shared
    )
    return MoE(cfg)


@pytest.mark.parametrize("top_k,shared", [(2, 1), (1, 0)])
def test_moe_bf16_grouped_gemms_equal_per_token_experts(top_k: int, shared: int) -> None:
    layer = _moe(top_k, shared).bfloat16()
    x = torch.randn(3, 11, 64).bfloat16()  # 33 tokens: groups of odd sizes, padded to 8 inside
    assert layer.use_grouped(x)
    y, aux = layer(x)
    flat = x.reshape(-1, 64)
    probs, weights, idx = layer.route(flat)
    ref = []
    for n, tok in enumerate(flat.float()):
        out = sum(layer.shared_experts[s].float()(tok) for s in range(shared)) if shared else torch.zeros(64)
        for j in range(top_k):
            out = out + weights[n, j].float() * layer.experts[int(idx[n, j])].float()(tok)
        ref.append(out)
    layer.bfloat16()
    torch.testing.assert_close(y.reshape(-1, 64).float(), torch.stack(ref), atol=3e-2, rtol=3e-2)


def test_moe_grouped_and_split_paths_agree_with_gradients() -> None:
    # The same bf16 layer through the grouped GEMMs and through the host-split loop.
    layer = _moe()
    x = torch.randn(2, 13, 64)

    def run(grouped: bool):
        torch.manual_seed(1)
        m = _moe().bfloat16()
        m.load_state_dict(layer.bfloat16().state_dict())
        m.use_grouped = lambda _x: grouped  # type: ignore[method-assign]
        xi = x.bfloat16().requires_grad_(True)
        y, aux = m(xi)
        (y.float().square().mean() + aux).backward()
        return y.float(), xi.grad.float(), {n: p.grad.float() for n, p in m.named_parameters()}

    y_g, dx_g, g_g = run(True)
    y_s, dx_s, g_s = run(False)
    torch.testing.assert_close(y_g, y_s, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dx_g, dx_s, atol=2e-3, rtol=5e-2)
    for name in g_s:
        torch.testing.assert_close(g_g[name], g_s[name], atol=2e-3, rtol=5e-2, msg=lambda m: f"{name}: {m}")
    assert all(g_g[f"experts.{e}.up_proj.weight"].abs().sum() > 0 for e in range(4))


def test_moe_model_forward_backward_reads_nothing_on_the_host(monkeypatch) -> None:
    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", use_moe=True, attn_backend="eager")).bfloat16().train()
    x = _ids(2, 12)
    pos = torch.tensor(PACKED)
    _NoHostReads(monkeypatch)
    out = model(x, position_ids=pos)
    (out.logits.float().square().mean() + out.aux_loss).backward()
    assert model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_moe_bf16_compiles_as_one_graph() -> None:
    torch.manual_seed(0)
    model = (
        LLM(
            ModelConfig.from_preset(
                "tiny", use_moe=True, num_experts_per_tok=1, num_shared_experts=0, attn_backend="eager"
            )
        )
        .bfloat16()
        .train()
    )
    x = _ids(2, 12)

    def run(fn):
        model.zero_grad(set_to_none=True)
        out = fn(x)
        (out.logits.float().square().mean() + out.aux_loss).backward()
        return out.logits.detach(), out.aux_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, aux, grads = run(model)
    c_logits, c_aux, c_grads = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(c_logits, logits, atol=0, rtol=0)
    torch.testing.assert_close(c_aux, aux, atol=0, rtol=0)
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


def test_moe_fp32_keeps_the_split_path() -> None:
    layer = _moe()
    assert not layer.use_grouped(torch.randn(1, 2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.use_grouped(torch.randn(1, 2, 64))  # bf16 autocast: fp32 weights, bf16 GEMMs
    unaligned = MoE(ModelConfig.from_preset("tiny", use_moe=True, moe_intermediate_size=100))
    assert not unaligned.bfloat16().use_grouped(torch.randn(1, 2, 64).bfloat16())
    # DeepSpeed ZeRO-3 partitions parameters (marked by ds_id) and gathers them per module call.
    zero3 = _moe().bfloat16()
    for p in zero3.parameters():
        p.ds_id = 0
    x = torch.randn(1, 5, 64).bfloat16()
    assert not zero3.use_grouped(x) and zero3(x)[0].shape == x.shape


# ---------------------------------------------------------------- dense aux loss


def test_dense_aux_loss_is_a_zero_device_tensor_without_host_reads(monkeypatch) -> None:
    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", attn_backend="sdpa")).train()
    _NoHostReads(monkeypatch)
    out = model(_ids(2, 12), position_ids=torch.tensor(PACKED))
    aux = out.aux_loss
    assert isinstance(aux, torch.Tensor) and aux.dim() == 0 and aux.device == out.logits.device
    assert not aux.requires_grad
    assert torch.equal(aux, torch.zeros(()))

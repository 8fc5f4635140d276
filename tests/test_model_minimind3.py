"""MiniMind-3 model: presets and their exact parameter counts, QK-norm against transformers' Qwen3
(dense and MoE, random weights), MiniMind-3's router and aux loss, and ModelConfig's field checks."""

from __future__ import annotations

import math
import time

import pytest
import torch

from llmcore.errors import LLMCoreError
from llmcore.model import LLM, ModelConfig, MoE, param_report

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("name,count", [("minimind-3", 63_912_192), ("minimind-3-moe", 198_416_640)])
def test_minimind3_presets_have_minimind_counts(name: str, count: int) -> None:
    cfg = ModelConfig.from_preset(name)
    assert param_report(cfg)["total"] == count
    assert cfg.head_dim == 96 and cfg.intermediate_size == math.ceil(768 * math.pi / 64) * 64 == 2432
    assert cfg.qk_norm and cfg.rms_norm_eps == 1e-6 and cfg.num_key_value_heads == 4
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_model_list_shows_minimind3_counts() -> None:
    from typer.testing import CliRunner

    from llmcore.cli_model import model_app

    out = CliRunner().invoke(model_app, ["list"]).output
    assert "63.91M" in out.split("minimind-3 ")[1].splitlines()[0]
    assert "198.42M" in out.split("minimind-3-moe")[1].splitlines()[0]


def test_qk_norm_parameter_names_follow_qwen3() -> None:
    model = LLM(ModelConfig.from_preset("tiny", qk_norm=True, head_dim=24))
    names = dict(model.named_parameters())
    assert names["layers.1.self_attn.q_norm.weight"].shape == (24,)
    assert names["layers.1.self_attn.k_norm.weight"].shape == (24,)
    assert "layers.0.self_attn.q_norm.weight" not in dict(LLM(ModelConfig.from_preset("tiny")).named_parameters())


# ---------------------------------------------------------------- parity with transformers' Qwen3


def _qwen3_pair(moe: bool, backend: str) -> tuple[torch.nn.Module, LLM]:
    """A random transformers Qwen3 (or Qwen3-MoE) model and our model holding the same weights."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=160,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=128,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )
    ours = dict(
        vocab_size=160,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=128,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        qk_norm=True,
        attn_backend=backend,
    )
    if moe:
        hf_cfg = transformers.Qwen3MoeConfig(
            **common,
            intermediate_size=96,
            moe_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=1,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        hf = transformers.Qwen3MoeForCausalLM(hf_cfg)
        cfg = ModelConfig(
            **ours,
            use_moe=True,
            num_experts=4,
            num_experts_per_tok=1,
            norm_topk_prob=True,
            num_shared_experts=0,
            moe_intermediate_size=48,
            intermediate_size=96,
        )
    else:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, intermediate_size=96))
        cfg = ModelConfig(**ours, intermediate_size=96)
    hf = hf.float().eval()
    with torch.no_grad():  # the norms start at 1 in both; random ones make the test see them
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model = LLM(cfg).eval()
    state: dict[str, torch.Tensor] = {}
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        name = name.removeprefix("model.")
        if name.endswith("mlp.experts.gate_up_proj"):  # transformers 5 stores experts fused
            prefix = name.removesuffix("gate_up_proj")
            for e in range(tensor.shape[0]):
                gate, up = tensor[e].chunk(2, dim=0)
                state[f"{prefix}{e}.gate_proj.weight"], state[f"{prefix}{e}.up_proj.weight"] = gate, up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e in range(tensor.shape[0]):
                state[f"{prefix}{e}.down_proj.weight"] = tensor[e]
        else:
            state[name] = tensor
    model.load_state_dict(state, strict=True)
    return hf, model


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_qk_norm_model_equals_transformers_qwen3(moe: bool, backend: str) -> None:
    hf, model = _qwen3_pair(moe, backend)
    x = torch.randint(0, 160, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=x).logits.float()
        out = model(x).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # Without QK-norm's weights the logits differ: the test sees the norm.
    with torch.no_grad():
        model.layers[0].self_attn.k_norm.weight.fill_(1.0)
        assert (model(x).logits - ref).abs().max() > 1e-3


# ---------------------------------------------------------------- MiniMind-3 router and aux loss


def test_minimind3_moe_router_and_aux_loss_follow_minimind() -> None:
    # MiniMind-3's MOEFeedForward written out: softmax router, top-1, weights renormalised (so 1),
    # aux = E * sum_i load_i * mean_prob_i * coef with load_i the share of tokens routed to i.
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(
        "tiny",
        use_moe=True,
        num_experts=4,
        num_experts_per_tok=1,
        norm_topk_prob=True,
        num_shared_experts=0,
        aux_loss_coef=5e-4,
    )
    layer = MoE(cfg)
    x = torch.randn(3, 7, 64)
    y, aux = layer(x)
    flat = x.reshape(-1, 64)
    scores = torch.softmax(layer.gate(flat), dim=-1)
    w, idx = torch.topk(scores, 1, dim=-1)
    w = w / (w.sum(-1, keepdim=True) + 1e-20)
    ref = torch.stack([w[n, 0] * layer.experts[int(idx[n, 0])](flat[n]) for n in range(flat.shape[0])])
    torch.testing.assert_close(y.reshape(-1, 64), ref, atol=1e-6, rtol=1e-5)
    load = torch.nn.functional.one_hot(idx, 4).float().mean(0)
    ref_aux = (load * scores.mean(0)).sum() * 4 * 5e-4
    torch.testing.assert_close(aux, ref_aux)


# ---------------------------------------------------------------- ModelConfig field checks


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_hidden_layers", 100_000_000),
        ("num_hidden_layers", 0),
        ("num_hidden_layers", 8.0),
        ("num_hidden_layers", True),
        ("num_hidden_layers", "8"),
        ("hidden_size", 1 << 20),
        ("vocab_size", 2**21),
        ("vocab_size", -1),
        ("head_dim", 10**6),
        ("intermediate_size", 0),
        ("max_position_embeddings", 2**31),
        ("num_experts", 10**5),
        ("num_shared_experts", -1),
        ("eos_token_id", -2),
        ("moe_intermediate_size", 1.5),
        ("rope_theta", float("nan")),
        ("rope_theta", 0.0),
        ("rope_theta", "1e6"),
        ("rms_norm_eps", float("inf")),
        ("rms_norm_eps", -1e-6),
        ("dropout", 1.5),
        ("initializer_range", -0.02),
        ("aux_loss_coef", float("nan")),
        ("qk_norm", 1),
        ("use_moe", "yes"),
        ("tie_word_embeddings", None),
        ("attn_backend", 3),
        ("rope_scaling", "yarn"),
        ("rope_scaling", {"type": "yarn", "factor": float("inf")}),
    ],
)
def test_config_refuses_bad_types_and_ranges_naming_the_field(field: str, value: object) -> None:
    d = ModelConfig.from_preset("tiny").to_dict()
    d[field] = value
    start = time.perf_counter()
    with pytest.raises(LLMCoreError, match=field) as info:
        ModelConfig.from_dict(d)
    assert time.perf_counter() - start < 1.0  # refused before anything is built
    assert "\n" not in str(info.value)


def test_config_refuses_fields_in_range_whose_product_is_not_buildable() -> None:
    d = {
        **ModelConfig.from_preset("tiny").to_dict(),
        "hidden_size": 65536,
        "num_hidden_layers": 1024,
        "num_attention_heads": 512,
        "num_key_value_heads": 512,
        "head_dim": None,
        "intermediate_size": 2**20,
    }
    with pytest.raises(LLMCoreError, match="parameters"):
        ModelConfig.from_dict(d)


def test_config_accepts_ints_for_float_fields_and_null_optionals() -> None:
    cfg = ModelConfig.from_dict(
        {**ModelConfig.from_preset("tiny").to_dict(), "rope_theta": 10000, "head_dim": None, "intermediate_size": None}
    )
    assert cfg.rope_theta == 10000 and cfg.head_dim == 16 and cfg.intermediate_size == 192


# ---------------------------------------------------------------- the triton backend with QK-norm


def test_triton_backend_with_qk_norm_matches_eager_packed() -> None:
    # QK-norm through the fused kernel and flash attention at a padded head dim (24 -> 32 tiles),
    # on packed rows; logits and every parameter's gradient equal the eager backend's.
    pytest.importorskip("triton")
    from _kernel_helpers import DEVICE

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", qk_norm=True, head_dim=24, rms_norm_eps=1e-6, attn_backend="eager")
    model = LLM(cfg).to(DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    x = torch.randint(0, 6400, (2, 13), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    pos = torch.tensor(
        [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4], [3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]], device=DEVICE
    )

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(x, position_ids=pos).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_logits, ref_grads = run()
    model.set_attn_backend("triton")
    logits, grads = run()
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert ref_grads["layers.0.self_attn.q_norm.weight"].abs().sum() > 0


def test_triton_qk_norm_model_graph_uses_the_fused_op() -> None:
    pytest.importorskip("triton")
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    from _kernel_helpers import DEVICE

    graphs = []

    def record(gm, _example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return make_boxed_func(gm.forward)

    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", qk_norm=True, attn_backend="triton")).to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    x = torch.randint(0, 6400, (1, 9), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    compiled(x, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5]], device=DEVICE)).logits.sum().backward()
    forward, backward = graphs
    layers = model.config.num_hidden_layers
    assert forward.count("llmcore.qk_norm_rope.default") == layers
    assert forward.count("llmcore.rope.default") == 0
    assert forward.count("llmcore.rms_norm.default") == 2 * layers + 1  # q/k norms are inside the fused op
    assert backward.count("llmcore.qk_norm_rope_backward.default") == layers


def test_qk_norm_kv_cache_matches_full_forward_on_every_backend() -> None:
    pytest.importorskip("triton")
    from _kernel_helpers import DEVICE

    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", qk_norm=True, head_dim=24, initializer_range=0.2)).to(DEVICE).eval()
    x = torch.randint(3, 6400, (2, 9), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        full = model.set_attn_backend("eager")(x).logits
        for backend in ("sdpa", "triton"):
            model.set_attn_backend(backend)
            cache = model.new_kv_cache(2, 9)
            steps = [model(x[:, :4], kv_cache=cache).logits] + [
                model(x[:, t : t + 1], kv_cache=cache).logits for t in range(4, 9)
            ]
            torch.testing.assert_close(torch.cat(steps, 1), full, atol=3e-5, rtol=1e-5, msg=lambda m: f"{backend}: {m}")


def test_triton_qk_norm_without_the_fused_kernel_under_zero3() -> None:
    # Parameters marked as DeepSpeed ZeRO-3 partitions: the norms run as their own modules (their
    # weights gathered per module call) with the RMSNorm and RoPE kernels; same logits.
    pytest.importorskip("triton")
    from _kernel_helpers import DEVICE

    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", qk_norm=True, attn_backend="triton")).to(DEVICE).eval()
    x = torch.randint(3, 6400, (1, 7), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with torch.no_grad():
        fused = model(x).logits
        for p in model.parameters():
            p.ds_id = 0
        import llmcore.kernels as K

        real, K.qk_norm_rope = K.qk_norm_rope, None  # would fail if called
        try:
            torch.testing.assert_close(model(x).logits, fused, atol=1e-5, rtol=1e-5)
        finally:
            K.qk_norm_rope = real

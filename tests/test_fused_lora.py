"""finetune.training.fused_lora: the addmm LoRA forward equals PEFT's, in values and gradients, or is not used."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import saved_bytes
from finetune.training import fused_lora


def _peft_model(model_dir, dtype=torch.float32, four_bit: bool = False, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=dtype)} if four_bit else {}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **quant)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(**({"r": 4, "lora_alpha": 8, "target_modules": "all-linear"} | lora)))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would hide any difference
            torch.nn.init.normal_(param, std=0.05)
    return model


def _run(model, ids, autocast: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits.float()
    logits.square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def test_same_values_and_gradients_fp32(tiny_llama):
    model = _peft_model(tiny_llama)
    ids = torch.randint(0, 200, (2, 24))
    want, want_grads = _run(model, ids)
    assert fused_lora.install(model) == 2 * 8, "q, k, v, o, gate, up, down and the MLP in both layers"
    got, got_grads = _run(model, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) == 2 * 2 * 7
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=1e-6, rtol=1e-4), name
    with model.disable_adapter(), torch.no_grad():  # the fallback: PEFT's own forward, i.e. the base model
        base = model(input_ids=ids).logits.float()
    assert not torch.allclose(base, want, atol=1e-3)


@pytest.mark.parametrize("groups", [False, True], ids=["alone", "groups"])
def test_bf16_autocast_no_less_accurate(tiny_llama, groups):
    """bf16 base, fp32 adapters, autocast (the training setup on a GPU): against an fp32 run of the same
    weights, the fused forward's logits and gradients are no further off than PEFT's own (q/k/v and gate/up
    grouped or not)."""
    import copy

    model = _peft_model(tiny_llama, dtype=torch.bfloat16)
    reference = copy.deepcopy(model).float()
    ids = torch.randint(0, 200, (2, 24))
    exact, exact_grads = _run(reference, ids)
    peft, peft_grads = _run(model, ids, autocast=True)
    fused_lora.install(model, groups=groups)
    got, got_grads = _run(model, ids, autocast=True)
    assert (got - exact).norm() <= 1.5 * (peft - exact).norm()

    def off(grads: dict[str, torch.Tensor]) -> torch.Tensor:  # relative error of each adapter gradient
        return torch.stack([(grads[n] - g).norm() / g.norm() for n, g in exact_grads.items()])

    assert off(got_grads).mean() <= 1.5 * off(peft_grads).mean()
    assert off(got_grads).max() < 0.1, "every gradient within bf16 rounding of the fp32 one"


def test_4bit_layers(tiny_llama):
    """QLoRA: bitsandbytes 4-bit base layers (its CPU backend)."""
    model = _peft_model(tiny_llama, four_bit=True)
    ids = torch.randint(0, 200, (2, 24))
    want, want_grads = _run(model, ids)
    assert fused_lora.install(model) == 2 * 8
    assert type(model.base_model.model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    got, got_grads = _run(model, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("lora", [{"lora_dropout": 0.1}, {"use_dora": True}, {"lora_bias": True}])
def test_other_lora_kinds_keep_peft_forward(tiny_llama, lora):
    model = _peft_model(tiny_llama, **lora)
    assert fused_lora.install(model) == 0


def test_install_twice_is_a_no_op(tiny_llama):
    model = _peft_model(tiny_llama)
    assert fused_lora.install(model) == 16
    assert fused_lora.install(model) == 0


def test_mlp_keeps_less_for_backward(tiny_llama):
    """Of the MLP's intermediate-sized activations only gate(x) and up(x) are kept: the plain model also
    keeps silu(gate) (for the product's backward) and the product (for down's lora_A); with Liger's
    SwiGLU on a GPU the first is already gone, the second is what this saves."""
    model = _peft_model(tiny_llama)
    ids = torch.randint(0, 200, (2, 24))
    _, before = saved_bytes(lambda: model(input_ids=ids))
    fused_lora.install(model)
    _, after = saved_bytes(lambda: model(input_ids=ids))
    cfg = model.config
    intermediate = ids.numel() * cfg.intermediate_size * 4  # one fp32 tensor of that size
    assert before - after == 2 * intermediate * cfg.num_hidden_layers


def test_mlp_without_lora_on_down_is_left_alone(tiny_llama):
    model = _peft_model(tiny_llama, target_modules=["q_proj", "gate_proj", "up_proj"])
    assert fused_lora.install(model) == 2 * 3
    assert not any(hasattr(m, "_unfused_forward") for m in model.modules())


def test_reinstall_after_another_patch(tiny_llama):
    """Liger binds its own MLP forward when Trainer.train starts; installing again puts ours back on top."""
    import types

    model = _peft_model(tiny_llama)
    fused_lora.install(model)
    mlp = model.base_model.model.model.layers[0].mlp
    foreign = types.MethodType(lambda self, x: self.down_proj(torch.nn.functional.silu(self.gate_proj(x))
                                                             * self.up_proj(x)), mlp)
    mlp.forward = foreign
    assert fused_lora.install(model) == 1
    assert fused_lora.is_fused(mlp) and mlp._unfused_forward is foreign


def _qlora_checkpointed(model_dir):
    model = _peft_model(model_dir, four_bit=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as TRL sets it
    model.enable_input_require_grads()
    model.train()
    return model


@pytest.mark.parametrize("tail", [True, False], ids=["base-last", "addmm"])
def test_recompute_stops_before_the_4bit_down_projection(tiny_llama, monkeypatch, tail):
    """In a checkpointed layer the 4-bit down projection's base matmul runs once a step, not again in the
    recompute (every other projection runs twice); the gradients are the fused addmm order's. ``addmm``
    (``BASE_LAST`` off, the bench's baseline): the base matmul first, which the recompute runs again."""
    monkeypatch.setattr(fused_lora, "BASE_LAST", tail)
    model = _qlora_checkpointed(tiny_llama)
    layers = model.base_model.model.model.layers
    ids = torch.randint(0, 200, (2, 24))
    fused_lora.install(model)  # every MLP fused, no down projection reordered: the reference
    want, want_grads = _run(model, ids)
    for layer in layers:  # back to the MLPs' own forward, as a checkpointed layer has it
        layer.mlp.forward = layer.mlp._unfused_forward
    fused_lora.install(model, recomputed_mlps=[layer.mlp for layer in layers])
    assert [layer.mlp.down_proj._base_last for layer in layers] == [tail] * len(layers)
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if name.endswith("base_layer"):
            module.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
    got, got_grads = _run(model, ids)
    downs = {n: c for n, c in calls.items() if "down_proj" in n}
    assert len(downs) == len(layers) and set(downs.values()) == {1 if tail else 2}
    assert len(calls) == 7 * len(layers) and {c for n, c in calls.items() if n not in downs} == {2}
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=1e-6, rtol=1e-4), name


def test_only_a_4bit_down_projection_computes_its_base_last(tiny_llama):
    """A plain (fp32/bf16) base layer saves its weight for backward, so its matmul would be recomputed in either
    order: it keeps the addmm."""
    model = _peft_model(tiny_llama)
    mlps = [layer.mlp for layer in model.base_model.model.model.layers]
    fused_lora.install(model, recomputed_mlps=mlps)
    assert not any(m.down_proj._base_last for m in mlps)
    assert not any(fused_lora.is_fused(m) for m in mlps), "the recomputed layers' MLPs keep their own forward"


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "4bit"])
def test_groups_share_the_first_matmul(tiny_llama, quantized):
    """q/k/v and gate/up compute their A products in one matmul per forward (each group once a layer), with the
    ungrouped values and gradients; checkpointed, the recompute computes each group's product once more."""
    model = _qlora_checkpointed(tiny_llama) if quantized else _peft_model(tiny_llama)
    layers = model.base_model.model.model.layers
    ids = torch.randint(0, 200, (2, 24))
    fused_lora.install(model)
    want, want_grads = _run(model, ids)
    fused_lora.install(model, groups=True)
    groups = {id(m._group): m._group for m in model.modules() if getattr(m, "_group", None) is not None}
    assert len(groups) == 2 * len(layers)
    assert sorted(len(g.members) for g in groups.values()) == sorted([2, 3] * len(layers))
    got, got_grads = _run(model, ids)
    assert {g.stacked for g in groups.values()} == {2 if quantized else 1}, "one product per forward (+ recompute)"
    assert all(not g._outs and g._x is None for g in groups.values()), "nothing held after the layer"
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=1e-6, rtol=1e-4), name


def test_a_group_member_called_alone_or_again_gets_its_own_product(tiny_llama):
    """Members called on other inputs, out of order or twice: each gets ``x @ A^T`` of its own input."""
    model = _peft_model(tiny_llama)
    fused_lora.install(model, groups=True)
    attn = model.base_model.model.model.layers[0].self_attn
    x, y = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    name = attn.q_proj._group.name
    outs = [attn.q_proj(x), attn.q_proj(x), attn.k_proj(y), attn.v_proj(x)]
    with torch.no_grad():
        for layer, inp, out in zip((attn.q_proj, attn.q_proj, attn.k_proj, attn.v_proj), (x, x, y, x), outs,
                                   strict=True):
            expect = layer.base_layer(inp) + layer.lora_B[name](layer.lora_A[name](inp)) * layer.scaling[name]
            assert torch.allclose(out, expect, atol=1e-6)
    assert attn.q_proj._group.stacked == 4, "q again, k on y, then v on x (y's product held): each a new one"


def test_groups_need_the_fused_forward_and_no_compile():
    from pydantic import ValidationError

    from finetune.core.recipe import TrainSpec

    with pytest.raises(ValidationError, match="fused_lora_groups is true but train.fused_lora is false"):
        TrainSpec(fused_lora_groups=True, fused_lora=False)
    with pytest.raises(ValidationError, match="fused_lora_groups and train.compile are both true"):
        TrainSpec(fused_lora_groups=True, compile=True)
    assert TrainSpec(fused_lora_groups=True).fused_lora_groups


def test_the_lora_update_is_added_in_place(tiny_llama):
    """No copy of any projection's output: the out-of-place addmm copied ``result`` into its output first (on CUDA a
    device-to-device memcpy per projection, forward and recompute), and the SwiGLU backward its input gradient."""
    from torch.profiler import profile

    model = _peft_model(tiny_llama)
    fused_lora.install(model)
    ids = torch.randint(0, 200, (2, 24))
    with profile(record_shapes=True) as prof:
        _run(model, ids)
    tokens = ids.numel()
    events = prof.key_averages(group_by_input_shape=True)
    assert sum(e.count for e in events if e.key == "aten::addmm_") == 2 * 8, "q, k, v, o, gate, up, down + swiglu"
    copies = [e.input_shapes for e in events if e.key == "aten::copy_" and e.input_shapes
              and len(e.input_shapes[0]) == 2 and e.input_shapes[0][0] == tokens]
    assert copies == [], f"copies of projection outputs: {copies}"


def test_groups_add_the_input_gradients_in_their_matmuls(tiny_llama):
    """Grouped, the hidden-sized elementwise adds of a forward and backward drop by at least 5 a layer: q/k/v and
    gate/up chain their input gradients through accumulating GEMMs instead of autograd's adds."""
    from torch.profiler import profile

    def adds(groups: bool) -> int:
        model = _peft_model(tiny_llama)
        fused_lora.install(model, groups=groups)
        ids = torch.randint(0, 200, (2, 24))
        with profile(record_shapes=True) as prof:
            _run(model, ids)
        hidden = (ids.numel(), model.config.hidden_size)  # [2, 24, 64] or flattened [48, 64]
        return sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                   if e.key in ("aten::add", "aten::add_") and len(e.input_shapes) >= 2
                   and all(s and (math.prod(s[:-1]), s[-1]) == hidden for s in e.input_shapes[:2]))

    layers = 2
    assert adds(True) <= adds(False) - 5 * layers

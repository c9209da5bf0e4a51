"""finetune.training.offload on a tiny random Llama with LoRA: the hooks take exactly the checkpointed layers' inputs,
backward recomputes from what they give back, and nothing is offloaded inside backward."""

from __future__ import annotations

import pytest
import torch

from finetune.training import offload


def _model(tiny_llama, reentrant: bool = False):
    """The tiny Llama with LoRA adapters (B not zero, so every adapter gets a gradient), every layer checkpointed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    return model


def _layers(model) -> list:
    return list(model.get_base_model().model.layers)


def _grads(model, run=None) -> tuple[float, dict[str, torch.Tensor]]:
    ids = torch.arange(24).reshape(2, 12) % 100
    loss = (run or (lambda: model(input_ids=ids, labels=ids).loss))()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_the_hooks_take_the_layer_inputs_and_give_them_back(tiny_llama, monkeypatch, reentrant):
    """One tensor (the hidden state) out and back per checkpointed layer; gradients equal checkpointing's exactly;
    and backward really recomputes from the copy the hooks give back (a perturbed copy changes the gradients)."""
    monkeypatch.setattr(offload, "COPY_ON_CPU", True)
    want_loss, want = _grads(_model(tiny_llama, reentrant))
    model = _model(tiny_llama, reentrant)
    wrappers = offload.install(_layers(model))
    assert len(wrappers) == 2 and offload.install(_layers(model)) == wrappers, "one wrapper per layer, once"
    loss, got = _grads(model)
    assert [(w.offloaded, w.restored) for w in wrappers] == [(1, 1), (1, 1)]
    assert loss == want_loss and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)

    unpack = offload.OffloadedCheckpoint.unpack
    monkeypatch.setattr(offload.OffloadedCheckpoint, "unpack", lambda self, packed: unpack(self, packed) * 1.001)
    model = _model(tiny_llama, reentrant)
    offload.install(_layers(model))
    _, perturbed = _grads(model)
    assert not torch.equal(perturbed["base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight"],
                           want["base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight"])


def test_cpu_tensors_pass_through(tiny_llama):
    """On CPU (COPY_ON_CPU off, the default) the hooks hand back the very tensor: nothing moves, nothing is counted."""
    model = _model(tiny_llama)
    wrappers = offload.install(_layers(model))
    hidden = torch.randn(2, 3, 4)
    assert wrappers[0].pack(hidden) is hidden and wrappers[0].unpack(hidden) is hidden
    _grads(model)
    assert [(w.offloaded, w.restored) for w in wrappers] == [(0, 0), (0, 0)]


def test_no_offload_inside_backward(tiny_llama, monkeypatch):
    """A layer recomputed inside backward (here by an outer reentrant checkpoint around the whole model, whose
    forward runs without grad) goes through its checkpoint function again: the hooks stay off then."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setattr(offload, "COPY_ON_CPU", True)
    ids = torch.arange(24).reshape(2, 12) % 100
    model = _model(tiny_llama)
    _, want = _grads(model)
    model.zero_grad()
    wrappers = offload.install(_layers(model))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)

    def outer():
        return checkpoint(lambda e: model(inputs_embeds=e, labels=ids).loss, embeds, use_reentrant=True)

    _, got = _grads(model, outer)
    assert [(w.offloaded, w.restored) for w in wrappers] == [(0, 0), (0, 0)]
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)

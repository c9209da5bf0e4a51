"""Packing without cross-contamination: per-sequence losses of packed rows equal those of rows alone."""

from __future__ import annotations

import pytest
import torch

from finetune.core.errors import FinetuneError
from finetune.core.recipe import TrainSpec
from finetune.training.levers import Levers, attention, liger_enabled, packing_enabled


def _seq_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="mean")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked(tiny_llama, attn):
    """TRL's padding-free collator (what train.packing feeds the model) keeps documents apart."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn).eval()
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 19, 3, 30, 12]
    seqs = [torch.randint(5, model.config.vocab_size, (n,), generator=gen) for n in lengths]
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collate([{"input_ids": s.tolist(), "seq_lengths": [len(s)]} for s in seqs])
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(lengths))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0]
        alone = [model(input_ids=s[None], use_cache=False).logits[0] for s in seqs]
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    for i, s in enumerate(seqs):
        got = _seq_loss(packed[starts[i]:starts[i + 1]], s)
        want = _seq_loss(alone[i], s)
        assert abs(got.item() - want.item()) < 1e-5, (i, got.item(), want.item())
    # the check can fail: the same row with one position sequence (documents attending across) differs
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert abs(_seq_loss(leaky[starts[1]:starts[2]], seqs[1]).item() - _seq_loss(alone[1], seqs[1]).item()) > 1e-3


def test_levers_resolve_on_cpu():
    spec = TrainSpec()
    assert spec.packing == "auto" and spec.liger == "auto" and spec.attention == "auto"
    if not torch.cuda.is_available():
        assert packing_enabled(spec) is False and liger_enabled(spec) is False
        with pytest.raises(FinetuneError, match="train.liger"):
            liger_enabled(TrainSpec(liger="on"))
    assert packing_enabled(TrainSpec(packing=True)) is True
    assert packing_enabled(TrainSpec(packing=True), classify=True) is False
    assert attention(spec, packing_enabled(spec)) is None
    assert attention(TrainSpec(attention="flex_attention"), packed=False) == "flex_attention"


def test_compiled_layers_train_without_liger(monkeypatch):
    """Liger's RMSNorm cannot be traced inside a compiled decoder layer (the H200 run's failure): with
    train.compile, ``auto`` resolves off where Liger would otherwise be on, and ``on`` is one clear line."""
    from finetune.training import levers

    monkeypatch.setattr(levers.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(levers.importlib.util, "find_spec", lambda name: object())  # as if liger-kernel were there
    assert liger_enabled(TrainSpec()) is True
    assert liger_enabled(TrainSpec(compile=True)) is False
    with pytest.raises(FinetuneError, match="train.liger: on with train.compile: true"):
        liger_enabled(TrainSpec(liger="on", compile=True))


def test_levers_are_resolved_once_into_the_plan():
    from conftest import recipe_dict
    from finetune.core.recipe import Recipe

    levers = Levers.resolve(Recipe.model_validate(recipe_dict("quickstart", train={"attention": "eager"})))
    assert levers.attention == "eager" and levers.load_kwargs == {"attn_implementation": "eager"}
    if not torch.cuda.is_available():
        assert (levers.precision, levers.packing, levers.liger, levers.dtype) == ("fp32", False, False, torch.float32)
    classifier = Levers.resolve(Recipe.model_validate(recipe_dict("distilbert-imdb", train={"packing": True})))
    assert classifier.classify and not classifier.packing and not classifier.liger


def test_packing_with_group_by_length_is_rejected():
    with pytest.raises(ValueError, match="group_by_length"):
        TrainSpec(packing=True, group_by_length=True)


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """What torch.nn.attention.varlen.varlen_attn computes (it needs CUDA), by separate sdpa calls."""
    assert window_size == (-1, 0), "causal"
    assert q.shape[1] == k.shape[1], "grouped-query heads expanded before the kernel"
    out = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
                   .transpose(0, 1))
    return torch.cat(out)


def test_varlen_glue_keeps_documents_apart(tiny_llama, monkeypatch):
    """finetune.training.varlen reshapes q/k/v, expands grouped kv heads and passes TRL's document boundaries;
    with a reference kernel, packed per-sequence losses equal separate sdpa runs (the real kernel is
    compared on the GPU by bench/train_speed.py)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from finetune.training import varlen

    monkeypatch.setattr(varlen, "kernel", lambda: _reference_varlen)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=varlen.register()).eval()
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    gen = torch.Generator().manual_seed(1)
    lengths = [11, 4, 25, 9]
    seqs = [torch.randint(5, model.config.vocab_size, (n,), generator=gen) for n in lengths]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": s.tolist(), "seq_lengths": [len(s)]} for s in seqs])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0]
        alone = [sdpa(input_ids=s[None], use_cache=False).logits[0] for s in seqs]
        whole = model(**inputs | {"cu_seq_lens_q": torch.tensor([0, starts[-1]], dtype=torch.int32),
                                  "cu_seq_lens_k": torch.tensor([0, starts[-1]], dtype=torch.int32),
                                  "max_length_q": starts[-1], "max_length_k": starts[-1]}, use_cache=False).logits[0]
    for i, s in enumerate(seqs):
        want = _seq_loss(alone[i], s).item()
        assert abs(_seq_loss(packed[starts[i]:starts[i + 1]], s).item() - want) < 1e-5, i
    # the check can fail: boundaries that make the row one document let documents see each other
    assert abs(_seq_loss(whole[starts[2]:starts[3]], seqs[2]).item() - _seq_loss(alone[2], seqs[2]).item()) > 1e-3


def test_varlen_needs_cuda_and_packing():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(FinetuneError, match="train.attention: varlen needs CUDA"):
        attention(TrainSpec(attention="varlen", packing=True), packed=True)
    assert attention(TrainSpec(packing=True), packed=True) is None, "auto stays sdpa without CUDA"

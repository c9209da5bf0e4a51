"""The benchmarks' own CPU-side pieces (what runs on a GPU host is measured there, bench/README.md)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))


def test_the_unsloth_peer_packs_every_token_into_full_rows():
    """bench/unsloth_peer.py's ``packed`` mode (issue 19's comparison): documents end to end, each with its EOS,
    cut into rows of exactly the length asked; only the last partial row is dropped."""
    from unsloth_peer import packed_rows

    class Tok:  # one id per character, BOS 1, EOS 2
        eos_token_id = 2

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [1] * add_special_tokens + [ord(c) for c in text]}

    docs = ["abc", "de", "fghij"]
    rows = packed_rows(docs, Tok(), 4)
    stream = [1, 97, 98, 99, 2, 1, 100, 101, 2, 1, 102, 103, 104, 105, 106, 2]
    assert rows == [stream[0:4], stream[4:8], stream[8:12], stream[12:16]]
    assert packed_rows(docs, Tok(), 5) == [stream[0:5], stream[5:10], stream[10:15]]  # 1 token left over


def test_liger_modules_counts_the_trainers_per_instance_patch():
    """The Trainer patches the model it got (``_apply_liger_kernel_to_instance``): each norm and MLP keeps its class,
    with ``forward`` and ``_get_name`` rebound on the instance (liger-kernel 0.8.5's ``_bind_method_to_module``).
    Counted by class, the first context run's ctx-16384 (Liger on) failed its own self-check."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    from train_speed import liger_modules

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert liger_modules(model) == 0
    for module in model.modules():
        if isinstance(module, (modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP)):
            name = "LigerRMSNorm" if isinstance(module, modeling_llama.LlamaRMSNorm) else "LigerSwiGLUMLP"
            module.__dict__["_get_name"] = (lambda self, n=name: n).__get__(module, type(module))
    assert liger_modules(model) == 7  # 2 x (two norms + MLP) + the final norm


def test_a_check_that_patches_the_llama_module_leaves_it_as_it_was():
    """Liger's apply_liger_kernel_to_llama swaps transformers' Llama classes module-wide; train_speed's checks run
    inside llama_module_restored, so the cases after them build the model they say (liger off: none of Liger's)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    from train_speed import liger_modules, llama_module_restored

    class LigerRMSNorm(modeling_llama.LlamaRMSNorm):  # what the patch puts there (liger-kernel is CUDA-only)
        pass

    original = modeling_llama.LlamaRMSNorm
    with llama_module_restored():
        modeling_llama.LlamaRMSNorm = LigerRMSNorm
        modeling_llama.added_by_a_patch = True
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1)
        assert liger_modules(LlamaForCausalLM(cfg)) == 3  # input, post-attention and final norms
    assert modeling_llama.LlamaRMSNorm is original and not hasattr(modeling_llama, "added_by_a_patch")
    torch.manual_seed(0)
    assert liger_modules(LlamaForCausalLM(cfg)) == 0


def test_the_context_probe_gives_both_sides_one_document_longer_than_the_length(tmp_path, smollm_tokenizer_dir):
    """``train_speed.py run --context L``: two documents of more than L tokens (the Alpaca rows end to end, repeated),
    so our stage (max_length L, one row a step) and Unsloth's packed stream both train on exactly L tokens of one
    document; the case trains at batch 1 with every layer recomputed from offloaded inputs."""
    import json

    import train_speed
    from finetune.core.models import open_tokenizer

    (tmp_path / "alpaca").mkdir()
    rows = [{"prompt": f"Instruction {i}:\n", "completion": f"answer number {i}."} for i in range(5)]
    (tmp_path / "alpaca" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = open_tokenizer(smollm_tokenizer_dir)
    name = train_speed.context_case(tmp_path, tokenizer, 600)  # far more than the 5 rows hold: repeated
    shape, dataset, _, train, steps = train_speed.CASES[name]
    assert (name, dataset, train["max_length"], train["batch_size"]) == ("ctx-600", "ctx600", 600, 1)
    assert train["gradient_checkpointing"] and train["offload_activations"] and train["packing"]
    docs = [json.loads(line) for line in (tmp_path / dataset / "train.jsonl").read_text().splitlines()]
    assert len(docs) == 2 and all(len(tokenizer(d["prompt"] + d["completion"])["input_ids"]) > 600 for d in docs)
    assert "answer number 4." in docs[0]["completion"] and docs[0]["completion"].count("Instruction 0:") > 1

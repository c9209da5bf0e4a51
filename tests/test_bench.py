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

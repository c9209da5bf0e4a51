"""Stage ``merge``: fold the LoRA adapter into the base loaded in 16-bit -> a standalone model.

The adapter must match the sha256 manifest train wrote. Never merges into 4-bit weights (that loses quality): the
base is reloaded in ``merge.dtype``, on the CPU: host RAM holds the whole 16-bit model (16 GB at 8B), no GPU is needed.
Saves weights, tokenizer, chat template and a generation config whose EOS matches the tokenizer.
Reads the ``model`` and ``merge`` sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.core.errors import FinetuneError
from finetune.core.inference import eos_ids
from finetune.core.models import check_adapter, load_adapter, load_model, open_tokenizer, save_tokenizer, torch_dtype
from finetune.core.outputs import atomic_dir, require_free
from finetune.core.recipe import Recipe


@dataclass(frozen=True)
class MergePlan:
    """The adapter to fold (checked against its manifest) and how the merged model is saved."""

    adapter_dir: Path
    dtype: torch.dtype  # merge.dtype: the base is reloaded in it, the merged model saved in it
    causal: bool  # a causal LM: its generation config stops at the tokenizer's EOS

    @classmethod
    def resolve(cls, recipe: Recipe, adapter_dir: str | Path) -> MergePlan:
        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise FinetuneError(f"{adapter_dir}/adapter_config.json: missing; run the train stage first")
        check_adapter(adapter_dir)
        return cls(adapter_dir, torch_dtype(recipe.merge.dtype), recipe.model.task == "causal_lm")


def merge(recipe: Recipe, adapter_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Run the stage; return a short summary."""
    plan = MergePlan.resolve(recipe, adapter_dir)
    base = load_model(recipe.model, plan.dtype)
    model = load_adapter(base, plan.adapter_dir).merge_and_unload()
    model = model.to(plan.dtype)
    tokenizer = open_tokenizer(plan.adapter_dir)
    if plan.causal:
        gen = model.generation_config
        eos = eos_ids(gen.eos_token_id, tokenizer.eos_token_id)
        gen.eos_token_id = eos[0] if len(eos) == 1 else eos
        gen.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    require_free(out_dir, 1.02 * weights, f"the merged {recipe.merge.dtype} model")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)  # with tokenizer.model: llama.cpp's converter needs it
    return {"dtype": recipe.merge.dtype, "eos_token": tokenizer.eos_token}

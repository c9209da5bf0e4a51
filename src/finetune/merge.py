"""Stage ``merge``: fold the LoRA adapter into the base loaded in 16-bit -> a standalone model.

The adapter must match the sha256 manifest train wrote. Never merges into 4-bit weights (that loses quality): the
base is reloaded in ``merge.dtype``, on the CPU: host RAM holds the whole 16-bit model (16 GB at 8B), no GPU is needed.
Saves weights, tokenizer, chat template and a generation config whose EOS matches the tokenizer.
Reads the ``model`` and ``merge`` sections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.models import check_adapter, load_adapter, load_model, torch_dtype
from finetune.outputs import atomic_dir, require_free
from finetune.recipe import Recipe


def eos_ids(generation_eos: int | list[int] | None, tokenizer_eos: int | None) -> list[int]:
    """The tokenizer's EOS first, then any the base's generation config already had."""
    existing = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    first = [tokenizer_eos] if tokenizer_eos is not None else []
    return first + [i for i in existing if i not in first]


def merge(recipe: Recipe, adapter_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Run the stage; return a short summary."""
    from transformers import AutoTokenizer

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FinetuneError(f"{adapter_dir}/adapter_config.json: missing; run the train stage first")
    check_adapter(adapter_dir)
    dtype = torch_dtype(recipe.merge.dtype)
    base = load_model(recipe.model, dtype)
    model = load_adapter(base, adapter_dir).merge_and_unload()
    model = model.to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if recipe.model.task == "causal_lm":
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
        tokenizer.save_pretrained(tmp)
    return {"dtype": recipe.merge.dtype, "eos_token": tokenizer.eos_token}

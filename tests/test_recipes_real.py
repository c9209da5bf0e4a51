"""Every shipped recipe on its real data (../shared/data), model swapped for a tiny one:
prepare + 2 train steps + merge, with the recipe's own quantization, optimizer and options."""

from __future__ import annotations

import json

import pytest

from conftest import recipe_dict, shared
from finetune.core.recipe import Recipe

pytestmark = pytest.mark.slow

CAUSAL = {
    "llama2-guanaco": {"local_path": "guanaco-llama2-1k/train-00000-of-00001.parquet"},
    "codellama-evol-instruct": {"local_path": "evol-instruct-code/evol-codealpaca-2k-1.json"},
    "llama2-python-code": {"local_path": "evol-instruct-code/code_alpaca_2k.json"},
    "llama3-alpaca": {"local_path": "alpaca/alpaca_data_1k.json"},
}
SHORT = {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "max_length": 256, "logging_steps": 1}


def _run(recipe: Recipe, tmp_path) -> dict:
    from finetune.stages.merge import merge
    from finetune.stages.prepare import prepare
    from finetune.stages.train import train

    stats = prepare(recipe, tmp_path / "prepared", tmp_path / "prepare.json")
    metrics = train(recipe, tmp_path / "prepared", tmp_path / "adapter", tmp_path / "train.json", live_dir=None)
    merge(recipe, tmp_path / "adapter", tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file()
    return stats | {"train": metrics}


@pytest.mark.parametrize("name", sorted(CAUSAL))
def test_causal_recipe_on_real_data(name, tiny_llama, tmp_path):
    data = {k: str(shared(v)) for k, v in CAUSAL[name].items()}
    raw = recipe_dict(name, model={"id": str(tiny_llama), "revision": None}, data=data, train=SHORT)
    recipe = Recipe.model_validate(raw)
    result = _run(recipe, tmp_path)
    assert result["rows_kept"] >= 0.95 * result["rows_raw"]
    assert result["splits"]["train"] > 500 and result["splits"]["test"] > 0
    assert result["train"]["steps"] == 2
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == recipe.lora.r and adapter["lora_alpha"] == recipe.lora.alpha
    if recipe.quant.mode == "4bit":
        assert result["train"]["trainable_params"] < result["train"]["total_params"]


def test_classification_recipe_on_real_data(minilm_dir, tmp_path):
    raw = recipe_dict(
        "distilbert-imdb",
        model={"id": minilm_dir, "revision": None},
        data={"local_path": str(shared("imdb/imdb_truncated_train.jsonl")),
              "test_path": str(shared("imdb/imdb_truncated_validation.jsonl")), "max_rows": 200},
        lora={"target_modules": ["query"]},  # BERT's name for DistilBERT's q_lin
        train={**SHORT, "max_length": 128, "batch_size": 16},  # 16: the 1000 test rows score in 63 batches, not 500
    )
    recipe = Recipe.model_validate(raw)
    result = _run(recipe, tmp_path)
    assert result["splits"] == {"train": 200, "eval": 0, "test": 1000}
    assert 0.0 <= result["train"]["test_accuracy"] <= 1.0
    from finetune.stages.quantize import quantize

    note = quantize(recipe.name, recipe.quantize, tmp_path / "merged", tmp_path / "prepared",
                    tmp_path / "models", tmp_path / "qmetrics")
    assert "skipped" in note and list((tmp_path / "models").iterdir()) == []

"""One type for "a model to run" (core.targets), one GGUF name, one EOS id list."""

from __future__ import annotations

from pathlib import Path

from conftest import recipe_dict
from finetune.core.gguf import gguf_name, gguf_type
from finetune.core.inference import eos_ids
from finetune.core.recipe import ModelSpec, parse_recipe
from finetune.core.targets import Target, resolve, stage_targets


def test_the_stages_targets_and_what_loads_them(tmp_path):
    recipe = parse_recipe(recipe_dict("quickstart", eval={"gguf_types": ["q8_0", "f16"]}), "quickstart")
    models = tmp_path / "models"
    models.mkdir()
    for qtype in ("f16", "q8_0", "q4_k_m"):
        (models / gguf_name(recipe.name, qtype)).write_bytes(b"")
    targets = stage_targets(recipe, tmp_path / "merged", models)
    assert [t.name for t in targets] == ["base", "finetuned", "gguf-f16", "gguf-q8_0"]  # eval.gguf_types only
    assert [t.backend for t in targets] == ["hf", "hf", "gguf", "gguf"]
    base, merged, f16 = targets[0].spec(recipe.model), targets[1].spec(recipe.model), targets[2].spec(recipe.model)
    assert base == recipe.model
    assert merged == ModelSpec(id=str(tmp_path / "merged"), task=recipe.model.task, num_labels=recipe.model.num_labels)
    assert f16 == ModelSpec(id=str(models), gguf_file="quickstart-f16.gguf")
    assert [t.name for t in stage_targets(recipe, tmp_path / "merged")] == ["base", "finetuned"]  # heldout's


def test_chat_serve_and_eval_name_gguf_files_alike(tmp_path):
    recipe = parse_recipe(recipe_dict("quickstart"), "quickstart")
    assert gguf_name("my-recipe", "q4_k_m") == "my-recipe-q4_k_m.gguf"
    assert gguf_type(Path("models") / gguf_name("my-recipe", "q4_k_m")) == "q4_k_m"
    (tmp_path / gguf_name(recipe.name, "q8_0")).write_bytes(b"")
    target = resolve("gguf:q8_0", recipe, tmp_path, tmp_path)
    assert target == Target("gguf", "gguf:quickstart-q8_0.gguf", tmp_path / "quickstart-q8_0.gguf")
    assert resolve("base", recipe) == Target("base", "base")


def test_eos_ids_put_the_tokenizers_first_once():
    assert eos_ids([2, 7], 7) == [7, 2]
    assert eos_ids(2, 2) == [2] and eos_ids(None, 5) == [5] and eos_ids([3], None) == [3]

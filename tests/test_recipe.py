"""The recipe schema: shipped recipes validate, errors are one line naming the key and the fix."""

from __future__ import annotations

import re

import pytest
import yaml

from conftest import ROOT, recipe_dict
from finetune.errors import FinetuneError
from finetune.recipe import (
    DistributedSpec,
    EvalSpec,
    LoraSpec,
    MergeSpec,
    QuantizeSpec,
    QuantSpec,
    Recipe,
    TrainSpec,
    load_recipe,
    parse_recipe,
    read_yaml,
    recipe_path,
)

RECIPES = sorted((ROOT / "recipes" / "recipe").glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert "quickstart" in names
    assert len(names) >= 6, names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.name == path.stem


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_header_says_how_to_reproduce(path):
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert "Reproduce:" in text, f"{path.name}: header has no 'Reproduce:' line"
    reproduce = text[text.index("Reproduce:"):].splitlines()[0]
    assert re.search(r"dvc exp run\b|make repro\b", reproduce), reproduce
    if "dvc exp run" in reproduce:
        assert f"recipe={path.stem}" in reproduce, reproduce


# --------------------------------------------------------------------------------------------
# one-line errors


def _error(raw, source="r.yaml") -> str:
    with pytest.raises(FinetuneError) as info:
        parse_recipe(raw, source)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{source}: "), msg
    return msg


def test_unknown_nested_key_suggests_nearest():
    msg = _error(recipe_dict("quickstart", lora={"rr": 4}))
    assert "'lora.rr'" in msg
    assert "did you mean 'lora.r'?" in msg


def test_misspelled_section_suggests_section():
    raw = recipe_dict("quickstart")
    raw["trian"] = raw.pop("train")
    msg = _error(raw)
    assert "unknown key 'trian'" in msg
    assert "did you mean 'train'?" in msg


def test_unknown_key_without_near_match_lists_valid_keys():
    msg = _error(recipe_dict("quickstart", lora={"zzzzzzzz": 1}))
    assert "'lora.zzzzzzzz'" in msg
    assert "valid keys here:" in msg and "target_modules" in msg


def test_wrong_type():
    msg = _error(recipe_dict("quickstart", train={"batch_size": "big"}))
    assert "train.batch_size" in msg
    assert "'big'" in msg
    assert "integer" in msg


def test_missing_required_key():
    raw = recipe_dict("quickstart")
    del raw["model"]["id"]
    msg = _error(raw)
    assert msg == "r.yaml: missing required key 'model.id'"


@pytest.mark.parametrize(
    ("section", "key", "value", "bound"),
    [
        ("train", "learning_rate", 0, "greater than 0"),
        ("train", "learning_rate", -1e-4, "greater than 0"),
        ("lora", "r", 0, "greater than or equal to 1"),
        ("lora", "dropout", 1.0, "less than 1"),
        ("lora", "dropout", 1.5, "less than 1"),
        ("train", "max_steps", -2, "greater than or equal to -1"),
    ],
)
def test_out_of_range(section, key, value, bound):
    msg = _error(recipe_dict("quickstart", **{section: {key: value}}))
    assert f"'{section}.{key}'" in msg
    assert repr(value) in msg
    assert bound in msg


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("train", "learning_rate", 1e-6), ("lora", "r", 1), ("lora", "dropout", 0.99), ("train", "max_steps", -1)],
)
def test_in_range_edges_are_accepted(section, key, value):
    recipe = parse_recipe(recipe_dict("quickstart", **{section: {key: value}}), "r.yaml")
    assert getattr(getattr(recipe, section), key) == value


def test_data_needs_id_or_local_path():
    msg = _error(recipe_dict("quickstart", data={"id": None, "local_path": None}))
    assert "data" in msg
    assert "`id`" in msg and "`local_path`" in msg
    assert "Value error" not in msg


def test_sequence_classification_needs_text_label():
    msg = _error(recipe_dict("quickstart", model={"task": "sequence_classification"}))
    assert "model.task" in msg and "sequence_classification" in msg
    assert "data.format text_label" in msg


def test_text_label_needs_sequence_classification():
    raw = recipe_dict("distilbert-imdb", model={"task": "causal_lm"})
    msg = _error(raw)
    assert "text_label" in msg and "sequence_classification" in msg


def test_not_a_mapping():
    msg = _error(["a", "b"])
    assert "expected a mapping" in msg and "list" in msg


def test_yaml_syntax_error_reports_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel:\n  id: a\n  task: [causal_lm\ndata:\n  format: chat\n", encoding="utf-8")
    with pytest.raises(FinetuneError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert "line 5, column 5" in msg  # where PyYAML notices the unclosed `[` of line 4


def test_yaml_syntax_error_exact_position(tmp_path):
    path = tmp_path / "tab.yaml"
    path.write_text("name: x\nmodel:\n\tid: a\n", encoding="utf-8")
    with pytest.raises(FinetuneError, match=r"line 3, column 1"):
        read_yaml(path)


def test_missing_file(tmp_path):
    with pytest.raises(FinetuneError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_non_utf8_yaml(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(FinetuneError, match="not UTF-8"):
        load_recipe(path)


def test_unknown_recipe_name_suggests_nearest():
    with pytest.raises(FinetuneError) as info:
        recipe_path("llama3-alpacca", ROOT)
    msg = str(info.value)
    assert "\n" not in msg
    assert "unknown recipe 'llama3-alpacca'" in msg
    assert "did you mean 'llama3-alpaca'?" in msg


def test_unknown_recipe_name_lists_known():
    with pytest.raises(FinetuneError) as info:
        recipe_path("zzzz", ROOT)
    assert "known recipes:" in str(info.value)
    assert "quickstart" in str(info.value)


def test_recipe_path_finds_shipped():
    assert recipe_path("quickstart", ROOT) == ROOT / "recipes" / "recipe" / "quickstart.yaml"


# --------------------------------------------------------------------------------------------
# Hydra config and params.yaml


CONFIG = yaml.safe_load((ROOT / "recipes" / "config.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("section", "model"),
    [("lora", LoraSpec), ("quant", QuantSpec), ("train", TrainSpec), ("merge", MergeSpec),
     ("quantize", QuantizeSpec), ("eval", EvalSpec), ("distributed", DistributedSpec)],
)
def test_config_defaults_equal_schema_defaults(section, model):
    assert CONFIG[section] == model().model_dump()


def test_config_has_no_other_sections():
    assert set(CONFIG) == {"defaults", "data", "lora", "quant", "train", "distributed", "merge", "quantize", "eval"}
    assert CONFIG["data"] == {"system_prompt": None}  # only the key dvc.yaml tracks outside the recipes
    assert {"recipe": "quickstart"} in CONFIG["defaults"]


def test_params_yaml_is_the_composed_quickstart(tmp_path):
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(ROOT / "recipes"), None, "config", "", ["recipe=quickstart"])
    composed = yaml.safe_load(out.read_text(encoding="utf-8"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert params == composed, "params.yaml is stale: run `python -m finetune use quickstart`"
    assert load_recipe(ROOT / "params.yaml").name == "quickstart"


@pytest.mark.parametrize(
    ("distributed", "needle"),
    [({"num_processes": 2}, "needs distributed.mode ddp or fsdp"),
     ({"mode": "ddp"}, "distributed.mode ddp needs distributed.num_processes >= 2"),
     ({"mode": "mpi", "num_processes": 2}, "'distributed.mode' = 'mpi'")],
)
def test_distributed_mode_and_processes_agree(distributed, needle):
    assert needle in _error(recipe_dict("quickstart", distributed=distributed))


def test_fsdp_qlora_needs_float_quant_storage():
    raw = recipe_dict("quickstart", distributed={"mode": "fsdp", "num_processes": 2}, quant={"mode": "4bit"},
                      model={"gguf_file": None, "id": "some/model"})
    assert "quant.quant_storage bfloat16" in _error(raw)
    raw["quant"]["quant_storage"] = "bfloat16"
    assert parse_recipe(raw, "r.yaml").quant.quant_storage == "bfloat16"


@pytest.mark.parametrize("name", ["quickstart", "llama3-alpaca", "llama2-guanaco", "codellama-evol-instruct",
                                  "llama2-python-code", "distilbert-imdb"])
def test_every_composed_recipe_has_the_params_dvc_yaml_tracks(tmp_path, name):
    """`dvc repro` stops at a stage whose params are missing from params.yaml (quantize tracks
    data.system_prompt, which only the quickstart sets)."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(ROOT / "recipes"), None, "config", "", [f"recipe={name}"])
    params = yaml.safe_load(out.read_text(encoding="utf-8"))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for stage in stages.values():
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: params.yaml lacks {key}"
                node = node[part]

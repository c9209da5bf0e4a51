"""Talk to what the pipeline made: ``finetune chat`` (interactive) and ``finetune generate`` (scripting).

Which model (``--model``):
- ``adapter``: the recipe's base model with the LoRA adapter (outputs/adapter) loaded on top (PEFT);
- ``merged``: the merge stage's standalone model (outputs/merged);
- ``base``: the recipe's base model, untouched (to compare);
- ``gguf`` / ``gguf:<type>``: models/<name>-<type>.gguf through llama.cpp (``gguf`` alone: the first
  of quantize.types that exists); ``gguf:<path>.gguf`` or any ``.gguf`` path: that file;
- a folder path: a merged model (config.json) or an adapter (adapter_config.json) at that path.
``--outputs``/``--models`` point at another run's folders (a dvc experiment checked out elsewhere).

Prompts go through the model's chat template (HF: the tokenizer's; GGUF: the one embedded in the
file), with the recipe's ``data.system_prompt`` as system message; generation stops at EOS. Tokens
stream as they come: transformers' TextIteratorStreamer, llama-cpp-python's streaming completion.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.core.errors import FinetuneError
from finetune.core.outputs import json_lines, write_jsonl
from finetune.core.recipe import ModelSpec, Recipe
from finetune.core.targets import Target, resolve
from finetune.data.formats import check_messages

Message = dict[str, str]


# ---------------------------------------------------------------------------------------------
# backends: each streams text pieces for a list of messages (or a raw prompt) and records why it stopped


class HFBackend:
    """transformers ``generate`` in a thread, text pieces from a TextIteratorStreamer."""

    def __init__(self, model, tokenizer):
        from finetune.core.inference import eos_ids  # here: a GGUF chat imports no torch (core.gguf_process)

        self.model, self.tokenizer = model, tokenizer
        self.eos = sorted(set(eos_ids(model.generation_config.eos_token_id, tokenizer.eos_token_id)))
        self.finish_reason: str | None = None
        self.new_tokens = 0
        self.stop = threading.Event()

    def _inputs(self, messages: list[Message] | None, prompt: str | None):
        if messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise FinetuneError("the tokenizer has no chat template; set model.chat_template or use --raw")
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                      return_tensors="pt")
        return self.tokenizer(prompt, return_tensors="pt")

    def stream(self, messages: list[Message] | None = None, prompt: str | None = None, *,
               max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        stop = self.stop

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stop.is_set()

        inputs = self._inputs(messages, prompt).to(self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        result: dict[str, Any] = {}
        self.stop.clear()
        torch.manual_seed(seed)

        def run() -> None:
            try:
                with torch.inference_mode():
                    result["ids"] = self.model.generate(
                        **inputs, streamer=streamer, max_new_tokens=max_new_tokens, eos_token_id=self.eos,
                        pad_token_id=self.tokenizer.pad_token_id or self.eos[0],
                        stopping_criteria=StoppingCriteriaList([_Stop()]), **sampling)
            except BaseException as err:  # noqa: BLE001 -- surface in the caller, and unblock the streamer
                result["error"] = err
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            for text in streamer:
                if text:
                    yield text
        finally:
            self.stop.set()
            thread.join()
        if "error" in result:
            raise result["error"]
        new = result["ids"][0, inputs["input_ids"].shape[1]:].tolist()
        self.new_tokens = len(new)
        self.finish_reason = "stop" if new and new[-1] in self.eos else "length"


class LlamaBackend:
    """llama-cpp-python; the chat template and EOS come from the GGUF's metadata."""

    def __init__(self, llm):
        self.llm = llm
        self.finish_reason: str | None = None
        self.new_tokens = 0

    def stream(self, messages: list[Message] | None = None, prompt: str | None = None, *,
               max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0) -> Iterator[str]:
        self.llm.reset()
        common = {"max_tokens": max_new_tokens, "temperature": temperature, "seed": seed, "stream": True}
        try:
            if messages is not None:
                chunks = self.llm.create_chat_completion(messages=messages, **common)
                pieces = ((c["choices"][0]["delta"].get("content"), c["choices"][0]["finish_reason"]) for c in chunks)
            else:
                chunks = self.llm.create_completion(prompt=prompt, **common)
                pieces = ((c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks)
            self.new_tokens = 0
            for text, finish in pieces:
                if finish:
                    self.finish_reason = finish
                if text:
                    self.new_tokens += 1
                    yield text
        except ValueError as err:  # llama.cpp: "Requested tokens (...) exceed context window of ..."
            raise FinetuneError(f"llama.cpp: {err}; start a new conversation (/reset) or raise --ctx") from None


def load(target: Target, recipe: Recipe, threads: int | None = None, ctx: int = 4096):
    """Load the backend for ``target`` (HF weights on GPU when present, else CPU)."""
    if target.backend == "gguf":
        from finetune.core.gguf import open_gguf

        return LlamaBackend(open_gguf(target.path, ctx, threads))

    import torch
    from transformers import AutoModelForCausalLM

    from finetune.core.inference import dtype as _dtype
    from finetune.core.models import check_adapter, load_adapter, load_model, load_tokenizer, open_tokenizer, reading

    if threads:
        torch.set_num_threads(threads)
    if recipe.model.task != "causal_lm":
        raise FinetuneError(f"model.task is {recipe.model.task}: chat needs a causal LM")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if target.path is None:
        with reading(recipe.model):  # a GGUF's header parsed once for both
            tokenizer, model = load_tokenizer(recipe.model), load_model(recipe.model, _dtype())
    elif target.kind == "adapter":
        check_adapter(target.path, required=target.name == "adapter")  # the pipeline's own has a manifest
        base_spec = _adapter_base(recipe.model, target.path)
        tokenizer = (open_tokenizer(target.path) if (target.path / "tokenizer_config.json").is_file()
                     else load_tokenizer(base_spec))
        model = load_adapter(load_model(base_spec, _dtype()), target.path)
    else:
        tokenizer = open_tokenizer(target.path)
        model = AutoModelForCausalLM.from_pretrained(target.path, dtype=_dtype())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return HFBackend(model.to(device).eval(), tokenizer)


def _adapter_base(spec: ModelSpec, adapter_dir: Path) -> ModelSpec:
    """The recipe's base model; the adapter must have been trained on it (same architecture)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise FinetuneError(f"{adapter_dir}/adapter_config.json: task_type {config['task_type']} is not CAUSAL_LM")
    return spec


# ---------------------------------------------------------------------------------------------
# chat and generate


def system_messages(system: str | None) -> list[Message]:
    return [{"role": "system", "content": system}] if system else []


HELP = "/reset starts over, /system TEXT sets the system prompt, /exit (or Ctrl-D) quits"


def run_chat(backend, system: str | None, label: str, *, read: Callable[[str], str] = input,
             write: Callable[[str], None] | None = None, max_new_tokens: int = 256,
             temperature: float = 0.0, seed: int = 0) -> int:
    """The interactive loop; returns the number of answered turns."""
    if write is None:
        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

    history: list[Message] = []
    turns = 0
    write(f"chatting with {label}; {HELP}\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("\n")
            return turns
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return turns
        if text == "/reset":
            history = []
            write("(new conversation)\n")
            continue
        if text.startswith("/system"):
            system = text.removeprefix("/system").strip() or None
            history = []
            write(f"(system prompt: {system!r}; new conversation)\n")
            continue
        messages = [*system_messages(system), *history, {"role": "user", "content": text}]
        write("model> ")
        answer: list[str] = []
        try:
            for piece in backend.stream(messages, max_new_tokens=max_new_tokens, temperature=temperature,
                                        seed=seed + turns):
                answer.append(piece)
                write(piece)
        except KeyboardInterrupt:
            write(" [stopped]")
        except FinetuneError as err:
            write(f"\nerror: {err}\n")
            continue
        write("\n" if backend.finish_reason != "length" else " [max tokens]\n")
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(answer)}]
        turns += 1


def read_requests(path: Path, raw: bool) -> list[dict[str, Any]]:
    """JSONL rows with ``prompt`` (a string) or ``messages`` (a list of {role, content})."""
    if not path.is_file():
        raise FinetuneError(f"--input {path}: file not found")
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for number, row in json_lines(fh, path):
                ok_prompt = isinstance(row, dict) and isinstance(row.get("prompt"), str)
                if not ok_prompt and not raw and isinstance(row, dict) and "messages" in row:
                    if (problem := check_messages(row["messages"])) is not None:
                        raise FinetuneError(f"{path}:{number}: {problem}")
                elif not ok_prompt:
                    need = ("'prompt' (a string)" if raw
                            else "'prompt' (a string) or 'messages' (a list of {role, content})")
                    raise FinetuneError(f"{path}:{number}: the row needs {need}")
                rows.append(row)
    except UnicodeDecodeError as err:
        raise FinetuneError(f"--input {path}: not UTF-8 text (byte {err.start}); give a JSONL file") from None
    if not rows:
        raise FinetuneError(f"--input {path}: no rows")
    return rows


def request_messages(row: dict[str, Any], system: str | None, raw: bool) -> tuple[list[Message] | None, str | None]:
    """(messages, None) for chat-templated requests, (None, prompt) for ``--raw`` text."""
    if raw:
        return None, row["prompt"]
    if "messages" in row and isinstance(row["messages"], list):
        messages = row["messages"]
        has_system = any(m["role"] == "system" for m in messages)
        return ([] if has_system else system_messages(system)) + messages, None
    return [*system_messages(system), {"role": "user", "content": row["prompt"]}], None


def generate_rows(backend, rows: list[dict[str, Any]], system: str | None, raw: bool, label: str, *,
                  max_new_tokens: int, temperature: float, seed: int,
                  on_piece: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Each row plus ``output``, ``finish_reason``, ``new_tokens`` and ``model``."""
    out = []
    for index, row in enumerate(rows):
        messages, prompt = request_messages(row, system, raw)
        pieces = []
        for piece in backend.stream(messages, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                    seed=seed + index):
            pieces.append(piece)
            if on_piece:
                on_piece(piece)
        out.append({**row, "output": "".join(pieces), "finish_reason": backend.finish_reason,
                    "new_tokens": backend.new_tokens, "model": label})
    return out


# ---------------------------------------------------------------------------------------------
# the commands


@dataclass(frozen=True)
class Options:
    """What `finetune chat` / `finetune generate` take besides the prompts."""

    model: str = "merged"
    outputs: str = "outputs"
    models: str = "models"
    system: str | None = None  # None: the recipe's data.system_prompt; "": none
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    threads: int | None = None
    ctx: int = 4096


def _system(recipe: Recipe, opts: Options) -> str | None:
    return recipe.data.system_prompt if opts.system is None else (opts.system or None)


def _backend(recipe: Recipe, opts: Options):
    target = resolve(opts.model, recipe, opts.outputs, opts.models)
    print(f"loading {target.name} ...", file=sys.stderr, flush=True)
    return target, load(target, recipe, opts.threads, opts.ctx)


def chat(recipe: Recipe, opts: Options) -> dict[str, Any]:
    """Interactive chat on stdin/stdout (readline editing where the terminal has it)."""
    try:
        import readline  # noqa: F401 -- importing it gives input() line editing and history
    except ImportError:
        pass
    target, backend = _backend(recipe, opts)
    turns = run_chat(backend, _system(recipe, opts), target.name, max_new_tokens=opts.max_new_tokens,
                     temperature=opts.temperature, seed=opts.seed)
    return {"model": target.name, "turns": turns}


def generate(recipe: Recipe, opts: Options, prompts: list[str], input_path: str | None,
             output_path: str | None, raw: bool) -> dict[str, Any] | None:
    """One-shot prompts: arguments stream to stdout; ``--input`` JSONL -> ``--output`` JSONL (atomic)."""
    if bool(prompts) == bool(input_path):
        raise FinetuneError("generate: give prompts as arguments or --input FILE.jsonl (not both, not neither)")
    if input_path and not output_path:
        raise FinetuneError("generate --input: also give --output FILE.jsonl ('-' for stdout)")
    rows = read_requests(Path(input_path), raw) if input_path else [{"prompt": p} for p in prompts]
    target, backend = _backend(recipe, opts)
    common = {"max_new_tokens": opts.max_new_tokens, "temperature": opts.temperature, "seed": opts.seed}
    system = _system(recipe, opts)
    if not input_path:  # stream each answer to stdout, one per line group
        for index, row in enumerate(rows):
            generate_rows(backend, [row], system, raw, target.name, on_piece=_echo,
                          **{**common, "seed": opts.seed + index})
            _echo("\n")
        return None
    out = generate_rows(backend, rows, system, raw, target.name, **common)
    if output_path == "-":
        sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
        return None
    write_jsonl(output_path, out)
    stops = sum(r["finish_reason"] == "stop" for r in out)
    return {"model": target.name, "output": output_path, "rows": len(out), "stopped_at_eos": stops}


def _echo(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()

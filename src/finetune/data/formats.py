"""Row formats: turn one raw row into ``{prompt, completion}`` (causal LM) or ``{text, label}``.

Pure functions of the row, the data spec and (for chat formats) the tokenizer's chat template.
The EOS token is not added here: the trainer appends it to every completion.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from finetune.core.errors import FinetuneError, one_line
from finetune.core.recipe import DataSpec

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

# the raw fields each format reads (before data.fields renames them); optional ones may be absent
REQUIRED = {
    "alpaca": ("instruction", "output"),
    "llama2_inst": ("text",),
    "chat": ("instruction", "output"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text_label": ("text", "label"),
}


class BadRow(ValueError):
    """A row that cannot be formatted; the message says why (used as the drop reason)."""


class TooLong(BadRow):
    """A formatted row over ``data.max_length`` tokens (``data.on_too_long`` decides)."""


TRUNCATED = "truncated to data.max_length"


def _n_tokens(tokenizer: Any, text: str, special: bool = True) -> int:
    return len(tokenizer(text, add_special_tokens=special)["input_ids"])


def fit_length(row: dict[str, Any], spec: DataSpec, tokenizer: Any) -> tuple[dict[str, Any], bool]:
    """``(row, truncated)`` within ``spec.max_length`` tokens; :class:`TooLong` when it must go.

    Truncation cuts the end of the completion (or of the text); a prompt that alone fills the
    limit leaves nothing to learn from, so that row is dropped even when truncating.
    """
    limit = spec.max_length
    if limit is None:
        return row, False
    text_key = "text" if "text" in row else "completion"
    full = row["text"] if text_key == "text" else row["prompt"] + row["completion"]
    length = _n_tokens(tokenizer, full)
    if length <= limit:
        return row, False
    if spec.on_too_long != "truncate":
        raise TooLong(f"longer than data.max_length {limit} tokens")
    keep = limit - (_n_tokens(tokenizer, row["prompt"]) if text_key == "completion" else _n_tokens(tokenizer, "", True))
    if keep < 1:
        raise TooLong(f"prompt alone fills data.max_length {limit} tokens")
    ids = tokenizer(row[text_key], add_special_tokens=False)["input_ids"][:keep]
    return row | {text_key: tokenizer.decode(ids)}, True


ROLES = ("system", "user", "assistant")  # what the chat formats write and chat templates render


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "a list", dict: "an object", str: "text"}.get(type(value), type(value).__name__)


def _field(row: dict[str, Any], spec: DataSpec, name: str, required: bool = True, text: bool = True) -> Any:
    key = spec.fields.get(name, name)
    value = row.get(key)
    if required and (value is None or (isinstance(value, str) and not value.strip())):
        raise BadRow(f"missing field '{key}'")
    if text and value is not None and not isinstance(value, str):  # a template would fail on it or print it
        raise BadRow(f"field '{key}' holding {_kind(value)}, not text")
    return value


def check_messages(messages: Any) -> str | None:
    """Why ``messages`` is not a non-empty list of ``{role, content}`` with known roles and text, or None."""
    if not isinstance(messages, list) or not messages:
        return "'messages' is not a non-empty list of {role, content}"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {index} is {_kind(message)}, not an object with role and content"
        if message.get("role") not in ROLES:
            role = one_line(repr(message.get("role")), 40)
            return f"message {index} with role {role} (use one of {', '.join(ROLES)})"
        if not isinstance(message.get("content"), str):
            return f"message {index} with content holding {_kind(message.get('content'))}, not text"
    return None


def _alpaca(row: dict, spec: DataSpec, tokenizer: Any) -> dict[str, str]:
    instruction = _field(row, spec, "instruction")
    inp = _field(row, spec, "input", required=False) or ""
    template = ALPACA_WITH_INPUT if str(inp).strip() else ALPACA_NO_INPUT
    return {"prompt": template.format(instruction=instruction, input=inp), "completion": _field(row, spec, "output")}


def _llama2_inst(row: dict, spec: DataSpec, tokenizer: Any) -> dict[str, str]:
    text = _field(row, spec, "text").strip()
    if "[/INST]" not in text:
        raise BadRow("no '[/INST]' marker in Llama-2 chat text")
    prompt, _, answer = text.rpartition("[/INST]")
    prompt = prompt.removeprefix("<s>").strip() + " [/INST]"
    answer = answer.strip().removesuffix("</s>").rstrip()
    if not answer:
        raise BadRow("empty answer after '[/INST]'")
    return {"prompt": prompt, "completion": " " + answer}


def _render_chat(messages: list[dict], spec: DataSpec, tokenizer: Any) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise FinetuneError(
            f"data.format {spec.format}: the tokenizer has no chat template; "
            "set model.chat_template or use data.format alpaca"
        )
    if spec.system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": spec.system_prompt}, *messages]
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except (TemplateError, TypeError) as err:  # e.g. the template's raise_exception("roles must alternate")
        raise BadRow(f"the chat template refused it ({one_line(str(err), 120)})") from None


def _chat(row: dict, spec: DataSpec, tokenizer: Any) -> dict[str, str]:
    instruction = _field(row, spec, "instruction")
    inp = _field(row, spec, "input", required=False)
    user = f"{instruction}\n\n{inp}" if inp and str(inp).strip() else instruction
    prompt = _render_chat([{"role": "user", "content": user}], spec, tokenizer)
    return {"prompt": prompt, "completion": _field(row, spec, "output")}


def _messages(row: dict, spec: DataSpec, tokenizer: Any) -> dict[str, str]:
    messages = _field(row, spec, "messages", text=False)
    if (problem := check_messages(messages)) is not None:
        raise BadRow(problem)
    last = messages[-1]
    if last.get("role") != "assistant" or not str(last.get("content", "")).strip():
        raise BadRow("the last message is not a non-empty assistant turn")
    if len(messages) < 2:
        raise BadRow("no prompt turns before the assistant answer")
    return {"prompt": _render_chat(messages[:-1], spec, tokenizer), "completion": last["content"]}


def _prompt_completion(row: dict, spec: DataSpec, tokenizer: Any) -> dict[str, str]:
    return {"prompt": _field(row, spec, "prompt"), "completion": _field(row, spec, "completion")}


def _text_label(row: dict, spec: DataSpec, tokenizer: Any, num_labels: int = 2) -> dict[str, Any]:
    text = _field(row, spec, "text")
    label = _field(row, spec, "label", text=False)
    if isinstance(label, str) and label.strip().isdigit():  # csv/tsv cells are text
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
        raise BadRow(f"label {label!r} is outside 0..{num_labels - 1}")
    return {"text": text, "label": label}


FORMATTERS = {
    "alpaca": _alpaca,
    "llama2_inst": _llama2_inst,
    "chat": _chat,
    "messages": _messages,
    "prompt_completion": _prompt_completion,
    "text_label": _text_label,
}


def format_row(row: dict[str, Any], spec: DataSpec, tokenizer: Any, num_labels: int = 2) -> dict[str, Any]:
    """Format one raw row; raise :class:`BadRow` with the reason when it cannot be used."""
    if not isinstance(row, dict):
        raise BadRow("row is not an object")
    if spec.format == "text_label":
        return _text_label(row, spec, tokenizer, num_labels)
    out = FORMATTERS[spec.format](row, spec, tokenizer)
    for key in ("prompt", "completion"):
        if not isinstance(out[key], str):
            raise BadRow(f"field for '{key}' is not text")
    return out

"""Hand-off files beside the GGUFs: an Ollama ``Modelfile`` per file and a note on LM Studio's layout.

The Modelfile's TEMPLATE is the model's own (Jinja) chat template translated to a Go template:
the Jinja template is rendered on sentinel conversations to find each role's prefix and suffix, the
pieces are checked by reassembling a longer conversation exactly as the Jinja template renders it,
and the Go template emits the same pieces as quoted string constants (so Go's whitespace trimming
never touches them). Stop tokens are the tokenizer's EOS, the generation config's EOS ids and the
special tokens that close an assistant turn or open a user turn. Where the chat template cannot
be expressed as role prefix/suffix pieces (one that folds the system prompt into the first user
turn, say), the Modelfile carries no TEMPLATE and Ollama uses the GGUF's embedded chat template.
Called by the quantize stage inside its atomic output folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

S, U1, A1, U2, A2 = "\x01SYS\x01", "\x01USER1\x01", "\x01ASSISTANT1\x01", "\x01USER2\x01", "\x01ASSISTANT2\x01"
MAX_NUM_CTX = 8192  # Ollama allocates the KV cache for num_ctx up front; more is a user's choice


@dataclass(frozen=True)
class TurnPieces:
    """The literal text a chat template wraps around each message, and the generation prompt."""

    start: str  # once, before the first message (BOS stripped: llama.cpp adds it from the GGUF)
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str
    default_system: str | None  # what the template inserts when no system message is given


def _render(tokenizer, messages: list[dict[str, str]], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _cut(text: str, head: str, what: str) -> str:
    if not text.startswith(head):
        raise ValueError(f"{what}: {text!r} does not start with {head!r}")
    return text[len(head):]


def turn_pieces(tokenizer) -> TurnPieces:
    """Read the per-role pieces off the tokenizer's chat template; ValueError where it has none.

    Raises ValueError when the template is not a plain sequence of role-wrapped messages.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    sys_user = [{"role": "system", "content": S}, {"role": "user", "content": U1}]
    full = [*sys_user, {"role": "assistant", "content": A1}, {"role": "user", "content": U2},
            {"role": "assistant", "content": A2}]
    try:
        text = _render(tokenizer, full, generation=False)
        plain = _render(tokenizer, sys_user, generation=False)
        with_gen = _render(tokenizer, sys_user, generation=True)
        user_only = _render(tokenizer, [{"role": "user", "content": U1}], generation=False)
    except Exception as err:  # noqa: BLE001 -- jinja2's TemplateError, or whatever else a template raises
        raise ValueError(f"the chat template refuses a system/user/assistant conversation ({err})") from None
    marks = [S, U1, A1, U2, A2]
    if [text.count(m) for m in marks] != [1] * 5:
        raise ValueError("the chat template does not place each message's content exactly once")
    positions = [text.index(m) for m in marks]
    if positions != sorted(positions):
        raise ValueError("the chat template reorders messages")
    segs, rest = [], text
    for mark in marks:
        head, rest = rest.split(mark, 1)
        segs.append(head)
    seg0, seg1, seg2, seg3, seg4 = segs
    assistant_suffix = rest
    user_suffix = plain.split(U1, 1)[1]
    generation = _cut(with_gen, plain, "generation prompt")
    assistant_prefix = _cut(seg2, user_suffix, "assistant prefix")
    user_prefix = _cut(seg3, assistant_suffix, "user prefix")
    if seg4 != user_suffix + assistant_prefix:
        raise ValueError("the second user turn is wrapped differently from the first")
    if not seg1.endswith(user_prefix):
        raise ValueError("the first user turn is wrapped differently from the second")
    system_suffix = seg1[: len(seg1) - len(user_prefix)]
    # what precedes the user turn when no system message is given: the start alone, or a default system turn
    before = user_only.split(U1, 1)[0]
    if not before.endswith(user_prefix):
        raise ValueError("a conversation without a system message starts differently")
    lead = before[: len(before) - len(user_prefix)]
    if lead.startswith(seg0) and lead.endswith(system_suffix) and len(lead) > len(seg0) + len(system_suffix):
        start, system_prefix = "", seg0
        default_system: str | None = lead[len(seg0): len(lead) - len(system_suffix)]
    elif seg0.startswith(lead):
        start, system_prefix, default_system = lead, seg0[len(lead):], None
    else:
        raise ValueError("the template's default system block is not a system turn")
    bos = added_bos(tokenizer)
    if bos and start.startswith(bos):  # llama.cpp adds BOS itself (tokenizer.ggml.add_bos_token)
        start = start[len(bos):]
    elif bos and not start and system_prefix.startswith(bos):
        system_prefix = system_prefix[len(bos):]
    pieces = TurnPieces(start=start, system=(system_prefix, system_suffix), user=(user_prefix, user_suffix),
                        assistant=(assistant_prefix, assistant_suffix), generation=generation,
                        default_system=default_system)
    check = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    want = _render(tokenizer, check, generation=True)
    want = want[len(bos):] if bos and want.startswith(bos) and not pieces.start.startswith(bos) else want
    if render_pieces(pieces, check, generation=True) != want:
        raise ValueError("the pieces do not reassemble the template's own rendering")
    return pieces


def added_bos(tokenizer) -> str:
    """The BOS text the tokenizer (and so llama.cpp, from the GGUF) prepends itself; '' if none."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    return bos if tokenizer("a")["input_ids"][:1] == [bos_id] else ""


def render_pieces(pieces: TurnPieces, messages: list[dict[str, str]], generation: bool) -> str:
    """What the Go template renders for ``messages`` (the same rules, in Python): for checks."""
    out = [pieces.start]
    for index, message in enumerate(messages):
        prefix, suffix = getattr(pieces, message["role"])
        last = index == len(messages) - 1
        out.append(prefix + message["content"] + ("" if last and message["role"] == "assistant" else suffix))
    if generation and (not messages or messages[-1]["role"] != "assistant"):
        out.append(pieces.generation)
    return "".join(out)


def go_quote(text: str) -> str:
    """A Go interpreted string literal (what text/template accepts as a string constant)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def go_template(pieces: TurnPieces) -> str:
    """Ollama's TEMPLATE for ``pieces``: every literal is a quoted constant between trimmed actions."""
    q = go_quote
    lines = [
        *([f"{{{{- {q(pieces.start)} }}}}"] if pieces.start else []),
        "{{- range $i, $_ := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        f'{{{{- if eq .Role "system" }}}}{{{{ {q(pieces.system[0])} }}}}{{{{ .Content }}}}'
        f'{{{{ {q(pieces.system[1])} }}}}',
        f'{{{{- else if eq .Role "user" }}}}{{{{ {q(pieces.user[0])} }}}}{{{{ .Content }}}}'
        f'{{{{ {q(pieces.user[1])} }}}}',
        f'{{{{- else if eq .Role "assistant" }}}}{{{{ {q(pieces.assistant[0])} }}}}{{{{ .Content }}}}'
        f'{{{{ if not $last }}}}{{{{ {q(pieces.assistant[1])} }}}}{{{{ end }}}}',
        "{{- end }}",
        f'{{{{- if and $last (ne .Role "assistant") }}}}{{{{ {q(pieces.generation)} }}}}{{{{ end }}}}',
        "{{- end }}",
    ]
    return "\n".join(lines)


def _token_strings(tokenizer, ids: Any) -> list[str]:
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return [t for t in tokenizer.convert_ids_to_tokens(ids) if t]


def special_tokens(tokenizer) -> list[str]:
    """Every token the tokenizer treats as special (named and added special tokens)."""
    found = set(tokenizer.all_special_tokens)
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            found.add(str(token))
    return sorted(found, key=lambda t: (-len(t), t))


def stop_tokens(tokenizer, eos_ids: Any, pieces: TurnPieces | None) -> list[str]:
    """EOS (tokenizer and generation config), then special tokens ending a turn or starting a user turn."""
    stops: list[str] = []
    candidates = [tokenizer.eos_token, *_token_strings(tokenizer, eos_ids)]
    if pieces is not None:
        specials = special_tokens(tokenizer)
        for text in (pieces.assistant[1], pieces.user[0]):
            candidates += sorted((t for t in specials if t in text), key=text.index)
    for token in candidates:
        if token and token not in stops:
            stops.append(token)
    return stops


def sampling_parameters(generation_config: dict[str, Any]) -> dict[str, float | int]:
    """Ollama PARAMETERs for the sampling the model's generation_config asks for (none when greedy)."""
    if not generation_config.get("do_sample"):
        return {}
    names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
             "repetition_penalty": "repeat_penalty", "min_p": "min_p"}
    return {ollama: generation_config[hf] for hf, ollama in names.items() if generation_config.get(hf) is not None}


def triple_quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise ValueError(f'{what} contains """; a Modelfile cannot quote it')
    return f'"""{text}"""'


def modelfile(gguf_name: str, template: str | None, stops: list[str], params: dict[str, Any],
              system: str | None, note: str) -> str:
    """The text of an Ollama Modelfile for the GGUF ``gguf_name`` in the same folder."""
    lines = [f"# Ollama: ollama create <name> -f {Path(gguf_name).stem}.Modelfile  (run in this folder)",
             f"# {note}", f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f"TEMPLATE {triple_quoted(template, 'the template')}")
    if system:
        lines.append(f"SYSTEM {triple_quoted(system, 'the system prompt')}")
    for stop in stops:
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    for key, value in params.items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"


def lmstudio_note(name: str, gguf_names: list[str]) -> str:
    """LM Studio wants ~/.lmstudio/models/<publisher>/<repo>/<file>.gguf; what to run for these files."""
    files = "\n".join(f"    {g}" for g in gguf_names)
    first = gguf_names[0] if gguf_names else f"{name}-q4_k_m.gguf"
    return (
        f"# {name}: GGUF files and how to run them elsewhere\n\n"
        f"Files (their chat template and EOS are embedded in the GGUF metadata):\n{files}\n\n"
        "## Ollama\n\n"
        "Each GGUF has a Modelfile beside it (FROM, TEMPLATE, SYSTEM, stop tokens):\n\n"
        f"    cd models && ollama create {name} -f {Path(first).stem}.Modelfile && ollama run {name}\n\n"
        "## LM Studio\n\n"
        "LM Studio lists a model found at `~/.lmstudio/models/<publisher>/<repo>/<file>.gguf`\n"
        "(a file straight under `models/` is not picked up). Either import it:\n\n"
        f"    lms import models/{first}\n\n"
        "or place it (a symlink keeps one copy):\n\n"
        f"    mkdir -p ~/.lmstudio/models/local/{name}\n"
        f"    ln -s \"$PWD/models/{first}\" ~/.lmstudio/models/local/{name}/\n\n"
        "LM Studio reads the chat template and stop token from the GGUF itself.\n"
    )


def write_handoff(out_dir: Path, name: str, gguf_names: list[str], model_dir: Path,
                  system_prompt: str | None = None) -> dict[str, Any]:
    """Write ``<file>.Modelfile`` for each GGUF and ``README.md`` into ``out_dir``; return a summary."""
    from finetune.core.models import open_tokenizer

    tokenizer = open_tokenizer(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    gen_path = model_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    try:
        pieces = turn_pieces(tokenizer)
        template = go_template(pieces)
        note = "TEMPLATE translated from the model's chat template (tokenizer_config / chat_template.jinja)"
    except ValueError as err:
        log.warning("Modelfile without TEMPLATE: %s; Ollama will use the GGUF's chat template", err)
        pieces, template = None, None
        note = f"no TEMPLATE ({err}); Ollama uses the chat template embedded in the GGUF"
    system = system_prompt or (pieces.default_system if pieces else None)
    params: dict[str, Any] = {}
    n_pos = config.get("max_position_embeddings")
    if isinstance(n_pos, int) and n_pos > 0:
        params["num_ctx"] = min(n_pos, MAX_NUM_CTX)
    params |= sampling_parameters(gen)
    stops = stop_tokens(tokenizer, gen.get("eos_token_id", config.get("eos_token_id")), pieces)
    for gguf in gguf_names:
        (out_dir / f"{Path(gguf).stem}.Modelfile").write_text(
            modelfile(gguf, template, stops, params, system, note), encoding="utf-8")
    (out_dir / "README.md").write_text(lmstudio_note(name, gguf_names), encoding="utf-8")
    return {"modelfiles": len(gguf_names), "template": template is not None, "stop": stops}

"""handoff: Modelfiles that Ollama's grammar accepts, and whose Go TEMPLATE renders what the HF chat template does.

No ollama binary here, so the test carries a parser of the Modelfile grammar (instructions, quoted and
triple-quoted arguments) and an evaluator of the Go text/template subset the TEMPLATE uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from finetune.use.handoff import go_quote, turn_pieces, write_handoff

INSTRUCTIONS = {"FROM", "ADAPTER", "TEMPLATE", "SYSTEM", "PARAMETER", "MESSAGE", "LICENSE", "REQUIRES"}
PARAMETERS = {"num_ctx", "stop", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n",
              "seed", "num_predict"}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs; raises ValueError where Ollama's parser would."""
    out, pos = [], 0
    while pos < len(text):
        line_end = text.find("\n", pos)
        line_end = len(text) if line_end < 0 else line_end
        line = text[pos:line_end]
        if not line.strip() or line.lstrip().startswith("#"):
            pos = line_end + 1
            continue
        match = re.match(r"\s*([A-Za-z]+)\s+", line)
        if not match or match.group(1).upper() not in INSTRUCTIONS:
            raise ValueError(f"unknown instruction in {line!r}")
        name, pos = match.group(1).upper(), pos + match.end()
        if text.startswith('"""', pos):
            end = text.find('"""', pos + 3)
            if end < 0:
                raise ValueError(f"{name}: unterminated triple-quoted string")
            arg, pos = text[pos + 3:end], end + 3
            rest_end = text.find("\n", pos)
            rest_end = len(text) if rest_end < 0 else rest_end
            if text[pos:rest_end].strip():
                raise ValueError(f"{name}: text after the closing triple quote")
            pos = rest_end + 1
        else:
            arg, pos = text[pos:line_end].strip(), line_end + 1
            if not arg:
                raise ValueError(f"{name}: missing argument")
        out.append((name, arg))
    return out


def parameter(arg: str) -> tuple[str, str]:
    name, _, value = arg.partition(" ")
    value = value.strip()
    if value.startswith('"'):
        value = json.loads(value)  # a quoted value (stop strings)
    return name, value


# --- a Go text/template subset: range/if/else if/else/end, :=, eq ne and not len slice, fields, strings ---

GO_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def go_unquote(lit: str) -> str:
    assert lit[0] == lit[-1] == '"', lit
    out, i, body = [], 0, lit[1:-1]
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            nxt = body[i + 1]
            if nxt == "x":
                out.append(chr(int(body[i + 2:i + 4], 16)))
                i += 4
                continue
            if nxt not in GO_ESCAPES:
                raise ValueError(f"invalid Go escape \\{nxt} in {lit}")
            out.append(GO_ESCAPES[nxt])
            i += 2
        elif ch == '"' or ch == "\n":
            raise ValueError(f"unescaped {ch!r} in Go string {lit}")
        else:
            out.append(ch)
            i += 1
    return "".join(out)


TOKEN = re.compile(r'\s*("(?:[^"\\\n]|\\.)*"|\(|\)|:=|,|\$\.?[A-Za-z_]\w*|\$|\.[A-Za-z_]\w*|-?\d+|[A-Za-z_]\w*)')


def tokens(action: str) -> list[str]:
    out, pos = [], 0
    while pos < len(action.rstrip()):
        m = TOKEN.match(action, pos)
        if not m:
            raise ValueError(f"bad token in action {{{{{action}}}}} at {action[pos:]!r}")
        out.append(m.group(1))
        pos = m.end()
    return out


def split_actions(template: str) -> list[tuple[str, str]]:
    """[('text', ...), ('action', ...)] with Go's trim markers applied; checks the delimiters balance."""
    parts, pos = [], 0
    while True:
        start = template.find("{{", pos)
        if start < 0:
            parts.append(("text", template[pos:]))
            break
        end = start + 2
        in_string = False
        while end < len(template):  # '}}' inside a string literal does not close the action
            ch = template[end]
            if in_string and ch == "\\":
                end += 2
                continue
            if ch == '"':
                in_string = not in_string
            elif not in_string and template.startswith("}}", end):
                break
            end += 1
        else:
            raise ValueError("unclosed {{")
        parts.append(("text", template[pos:start]))
        parts.append(("action", template[start + 2:end]))
        pos = end + 2
    for index, (kind, body) in enumerate(parts):
        if kind != "action":
            if "}}" in body:
                raise ValueError(f"stray }} in text {body!r}")
            continue
        if body.startswith("- "):
            parts[index - 1] = ("text", parts[index - 1][1].rstrip())
            body = body[2:]
        if body.endswith(" -"):
            parts[index + 1] = ("text", parts[index + 1][1].lstrip())
            body = body[:-2]
        parts[index] = ("action", body.strip())
    return parts


def parse_go(template: str) -> list:
    """A tree of ('text', s) / ('out', expr) / ('set', var, expr) / ('if', [(cond, body)...], else) / ('range', ...)."""
    items = split_actions(template)
    pos = 0

    def block(stop: set[str]) -> tuple[list, str]:
        nonlocal pos
        body = []
        while pos < len(items):
            kind, value = items[pos]
            pos += 1
            if kind == "text":
                if value:
                    body.append(("text", value))
                continue
            toks = tokens(value)
            head = toks[0] if toks else ""
            if head in ("end", "else"):
                if head not in stop and not (head == "else" and "else" in stop):
                    raise ValueError(f"unexpected {{{{{value}}}}}")
                return body, value
            if head == "if":
                branches, otherwise, cond = [], [], toks[1:]
                while True:
                    inner, closer = block({"end", "else"})
                    branches.append((cond, inner))
                    ctoks = tokens(closer)
                    if ctoks[0] == "end":
                        break
                    if ctoks[1:2] == ["if"]:
                        cond = ctoks[2:]
                        continue
                    otherwise, closer = block({"end"})
                    break
                body.append(("if", branches, otherwise))
            elif head == "range":
                if toks[1:5] != ["$i", ",", "$_", ":="] or len(toks) != 6:
                    raise ValueError(f"unsupported range {value!r}")
                inner, _ = block({"end"})
                body.append(("range", toks[5], inner))
            elif len(toks) > 2 and toks[0].startswith("$") and toks[1] == ":=":
                body.append(("set", toks[0], toks[2:]))
            else:
                body.append(("out", toks))
        if stop:
            raise ValueError("missing {{ end }}")
        return body, ""

    tree, _ = block(set())
    return tree


def evaluate(toks: list[str], scope: dict):
    def term(i: int):
        tok = toks[i]
        if tok == "(":
            value, i = call(i + 1)
            if toks[i] != ")":
                raise ValueError("unbalanced parentheses")
            return value, i + 1
        if tok.startswith('"'):
            return go_unquote(tok), i + 1
        if re.fullmatch(r"-?\d+", tok):
            return int(tok), i + 1
        if tok.startswith("$."):
            return scope["$"][tok[2:]], i + 1
        if tok.startswith("."):
            return scope["."][tok[1:]], i + 1
        if tok.startswith("$"):
            return scope[tok], i + 1
        raise ValueError(f"unexpected {tok!r}")

    funcs = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda a, b: a and b,
             "not": lambda a: not a, "len": len, "slice": lambda s, i: s[i:]}

    def call(i: int):
        if toks[i] in funcs:
            fn, args, i = funcs[toks[i]], [], i + 1
            while i < len(toks) and toks[i] != ")":
                value, i = term(i)
                args.append(value)
            return fn(*args), i
        return term(i)

    value, end = call(0)
    if end != len(toks):
        raise ValueError(f"trailing tokens {toks[end:]}")
    return value


def render_go(tree: list, scope: dict) -> str:
    out = []
    for node in tree:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            out.append(str(evaluate(node[1], scope)))
        elif node[0] == "set":
            scope[node[1]] = evaluate(node[2], scope)
        elif node[0] == "if":
            for cond, body in node[1]:
                if evaluate(cond, scope):
                    out.append(render_go(body, scope))
                    break
            else:
                out.append(render_go(node[2], scope))
        elif node[0] == "range":
            for index, item in enumerate(evaluate([node[1]], scope)):
                out.append(render_go(node[2], {**scope, ".": item, "$i": index, "$_": item}))
    return "".join(out)


def render_ollama(template: str, messages: list[dict]) -> str:
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    root = {"Messages": msgs}
    return render_go(parse_go(template), {"$": root, ".": root})


# --- tests ---

CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": 'Say "hi"\n\tplease {{ .x }} }}'},
     {"role": "assistant", "content": "hi"}, {"role": "user", "content": "Again, in ünïcode ✓"}],
]


@pytest.fixture(scope="module")
def handoff_dir(tmp_path_factory, tiny_llama) -> Path:
    out = tmp_path_factory.mktemp("models")
    for name in ("tiny-q8_0.gguf", "tiny-q4_k_m.gguf"):
        (out / name).write_bytes(b"GGUF")
    write_handoff(out, "tiny", ["tiny-q8_0.gguf", "tiny-q4_k_m.gguf"], tiny_llama, "You are a helpful assistant.")
    return out


def test_modelfile_parses_with_template_stops_and_parameters(handoff_dir, tiny_llama):
    from transformers import AutoTokenizer

    assert sorted(p.name for p in handoff_dir.iterdir()) == [
        "README.md", "tiny-q4_k_m.Modelfile", "tiny-q4_k_m.gguf", "tiny-q8_0.Modelfile", "tiny-q8_0.gguf"]
    parsed = parse_modelfile((handoff_dir / "tiny-q4_k_m.Modelfile").read_text())
    names = [n for n, _ in parsed]
    assert names[0] == "FROM" and names.count("FROM") == 1 and names.count("TEMPLATE") == 1
    source = dict(parsed)["FROM"]
    assert (handoff_dir / source).resolve() == (handoff_dir / "tiny-q4_k_m.gguf").resolve()
    assert dict(parsed)["SYSTEM"] == "You are a helpful assistant."
    params = [parameter(a) for n, a in parsed if n == "PARAMETER"]
    assert all(name in PARAMETERS for name, _ in params)
    stops = [v for k, v in params if k == "stop"]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert stops[0] == tok.eos_token == "<|im_end|>"  # ends an assistant turn in SmolLM2's ChatML
    assert "<|im_start|>" in stops  # a new turn starting also stops
    assert dict(params)["num_ctx"] == "512"  # the tiny model's max_position_embeddings


def test_go_template_renders_what_the_hf_chat_template_renders(handoff_dir, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    template = dict(parse_modelfile((handoff_dir / "tiny-q8_0.Modelfile").read_text()))["TEMPLATE"]
    for messages in CONVERSATIONS:
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_ollama(template, messages) == want
    # a trailing assistant message is left open, for Ollama to continue it
    partial = [*CONVERSATIONS[0], {"role": "assistant", "content": "The answer"}]
    assert render_ollama(template, partial).endswith("<|im_start|>assistant\nThe answer")


def test_template_default_system_becomes_system_when_the_recipe_has_none(tmp_path, tiny_llama):
    write_handoff(tmp_path, "tiny", ["tiny-f16.gguf"], tiny_llama, None)
    system = dict(parse_modelfile((tmp_path / "tiny-f16.Modelfile").read_text()))["SYSTEM"]
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_parser_and_evaluator_reject_broken_input():
    with pytest.raises(ValueError, match="unterminated"):
        parse_modelfile('FROM ./x.gguf\nTEMPLATE """{{ .Content }}\n')
    with pytest.raises(ValueError, match="unknown instruction"):
        parse_modelfile("FROM ./x.gguf\nTEMPERATURE 0.7\n")
    with pytest.raises(ValueError, match="missing"):
        parse_go("{{ if .Content }}x")
    with pytest.raises(ValueError, match="unclosed"):
        parse_go("{{ .Content ")
    with pytest.raises(ValueError, match="escape"):
        go_unquote('"\\q"')


def test_go_quote_round_trips_awkward_text():
    text = 'a"b\\c\n\t\r\x01 ✓ }} {{'
    assert go_unquote(go_quote(text)) == text


def test_template_that_folds_system_into_user_gets_no_template(tmp_path, tiny_llama):
    """A template that rejects system messages cannot be pieces; Ollama then uses the GGUF's own."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                         "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    tok.save_pretrained(model)
    with pytest.raises(ValueError, match="refuses"):
        turn_pieces(AutoTokenizer.from_pretrained(model))
    write_handoff(tmp_path, "tiny", ["tiny-f16.gguf"], model, "sys")
    parsed = parse_modelfile((tmp_path / "tiny-f16.Modelfile").read_text())
    assert "TEMPLATE" not in dict(parsed) and ("PARAMETER", 'stop "<|im_end|>"') in parsed

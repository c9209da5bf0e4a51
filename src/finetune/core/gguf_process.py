"""llama.cpp in a process of its own: quantizing, checking and generating with GGUF files.

llama-cpp-python built with CUDA crashes in a process that also loaded PyTorch's CUDA libraries
(seen on an H200 host: a segfault at ``Llama(...)`` after ``import torch``, ``free(): invalid
pointer`` in the other order, even with no layer offloaded; bench/README.md). The quantize and eval
stages hold HF models in PyTorch, so every llama.cpp call goes through :func:`call`: a fresh
``python -m finetune.core.gguf_process`` that imports llama.cpp and numpy, never torch, with the request
and the answer as JSON files. The checks' logic stays with the caller; here is only what llama.cpp
computes (same calls and threads as before, so the CPU results are unchanged).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from finetune.core.errors import FinetuneError


def call(command: str, request: dict[str, Any]) -> dict[str, Any]:
    """Run ``command`` with ``request`` in a child process; its one-line error becomes ours."""
    with tempfile.TemporaryDirectory(prefix="ft-llama-") as tmp:
        inp, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps(request))
        proc = subprocess.run([sys.executable, "-m", "finetune.core.gguf_process", command, str(inp), str(out)],
                              env=os.environ | {"PYTHONPATH": _pythonpath()})
        answer = json.loads(out.read_text()) if out.is_file() else {}
    if "error" in answer:
        raise FinetuneError(answer["error"])
    if proc.returncode != 0 or "result" not in answer:
        raise FinetuneError(f"llama.cpp {command} ended with code {proc.returncode} (its output is above)")
    return answer["result"]


def generate(path: str | Path, prompts: list[str], max_tokens: int, threads: int, temperature: float = 0.0,
             seed: int = 0, n_ctx: int = 2048) -> tuple[list[str], str]:
    """Completions of ``prompts`` by the GGUF at ``path`` (:func:`finetune.core.gguf.complete`: side by side
    on a GPU); returns the texts and where they ran (cuda or cpu)."""
    out = call("generate", {"path": str(path), "n_ctx": n_ctx, "prompts": prompts, "max_tokens": max_tokens,
                            "temperature": temperature, "seed": seed, "threads": threads})
    return out["texts"], out["device"]


def _pythonpath() -> str:
    """The child imports this same finetune package (a source checkout's src/ before an installed one)."""
    here = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])


# ---------------------------------------------------------------------------------------------
# the child side: llama.cpp only


def _quantize(req: dict) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, req["ftype"])
    params.nthread = req["threads"]
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(req["src"].encode(), req["dst"].encode(), params)
    if rc != 0 or not Path(req["dst"]).is_file():
        raise FinetuneError(f"quantize.types: llama.cpp could not quantize {Path(req['src']).name} to "
                            f"{req['qtype']} (code {rc})")
    return {"seconds": time.perf_counter() - start}


def greedy(llm, prompt_ids: list[int], max_new: int, eos: set[int]) -> list[int]:
    """llama.cpp's greedy continuation, one token per eval, stopping after an EOS token."""
    import numpy as np

    llm.reset()
    llm.eval(prompt_ids)
    out: list[int] = []
    for _ in range(max_new):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token in eos:
            break
        llm.eval([token])
    return out


def nll(logits, targets: list[int]) -> float:
    """Summed negative log-likelihood of ``targets`` under float64 log-softmax of ``logits``."""
    import numpy as np

    logits = np.asarray(logits).astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    logz = (top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1)))
    return float((logz - logits[np.arange(len(targets)), targets]).sum())


def perplexity(llm, sequences: list[list[int]]) -> float:
    total, count = 0.0, 0
    for ids in sequences:
        llm.reset()
        llm.eval(ids)
        total += nll(llm.scores[: len(ids) - 1], ids[1:])
        count += len(ids) - 1
    return math.exp(total / count)


def _inspect(req: dict) -> dict:
    """What the quantize checks compare: tokenization, EOS, greedy tokens, stopping, perplexity."""
    from finetune.core.gguf import device_name, open_gguf

    llm = open_gguf(req["path"], req["n_ctx"], req["threads"], logits_all=True)
    add_bos = bool(llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true")
    eos = set(req["eos"])
    out = {
        "device": device_name(),
        "specials": {t: llm.tokenize(t.encode(), add_bos=False, special=True) for t in req["specials"]},
        "eos": llm.token_eos(),
        "prompts": [llm.tokenize(p.encode(), add_bos=add_bos, special=True) for p in req["prompts"]],
        "greedy": [greedy(llm, ids, req["max_new"], eos) for ids in req["prompt_ids"]],
        "finish": {},
    }
    for index in req["stop_check"]:  # llama.cpp's own completion loop must stop where the HF model did
        llm.reset()
        choice = llm.create_completion(req["prompt_ids"][index], max_tokens=req["max_new"] + 1, temperature=0.0)
        out["finish"][str(index)] = choice["choices"][0]["finish_reason"]
    out["perplexity"] = perplexity(llm, req["sequences"])
    return out


def _generate(req: dict) -> dict:
    from finetune.core.gguf import complete, device_name, open_gguf

    llm = open_gguf(req["path"], req["n_ctx"], req["threads"], seed=req["seed"])
    texts = complete(llm, req["prompts"], req["max_tokens"], temperature=req["temperature"], seed=req["seed"])
    return {"texts": texts, "device": device_name()}


COMMANDS = {"quantize": _quantize, "inspect": _inspect, "generate": _generate}


def main(argv: list[str]) -> int:
    command, inp, out = argv
    try:
        result = {"result": COMMANDS[command](json.loads(Path(inp).read_text()))}
    except FinetuneError as err:
        result = {"error": str(err)}
    if "torch" in sys.modules:  # the point of this process (module docstring); a test relies on it
        result = {"error": f"finetune.core.gguf_process: torch was imported in the llama.cpp process ({command})"}
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

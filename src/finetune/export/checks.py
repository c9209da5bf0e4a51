"""The checks that a GGUF file is the merged model: the same tokens, the same greedy continuation, EOS
where the HF model stops, perplexity next to the HF model's.

The HF side is computed first and kept (:func:`reference`: its greedy tokens and every step's logits),
so its memory is free before llama.cpp loads a file; llama.cpp's side comes from
:mod:`finetune.core.gguf_process`'s ``inspect``. A mismatch fails the stage naming the prompt and the
first differing token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.core import gguf_process, inference
from finetune.core.errors import FinetuneError

F16_PPL_TOLERANCE = 0.02  # f16 perplexity may differ from the HF model's by at most 2%


def specials(tokenizer) -> list[str]:
    return sorted({t for t in [tokenizer.bos_token, tokenizer.eos_token, *tokenizer.all_special_tokens] if t})


def check_tokenizer(cpp: dict, tokenizer, prompts: list[str], name: str) -> None:
    """Special tokens are single, equal ids on both sides; prompts tokenize identically (``cpp``: what
    llama.cpp made of them, from gguf_process's ``inspect``)."""
    for token in specials(tokenizer):
        hf_ids = tokenizer.convert_tokens_to_ids([token])
        cpp_ids = cpp["specials"][token]
        if len(cpp_ids) != 1 or cpp_ids != hf_ids:
            raise FinetuneError(f"{name}: special token {token!r} is {cpp_ids} in the GGUF but {hf_ids} "
                                "in the HF tokenizer")
    if tokenizer.eos_token_id is not None and cpp["eos"] != tokenizer.eos_token_id:
        raise FinetuneError(
            f"{name}: EOS id is {cpp['eos']} in the GGUF but {tokenizer.eos_token_id} "
            f"({tokenizer.eos_token!r}) in the HF tokenizer; generations would not stop"
        )
    for index, (prompt, cpp_ids) in enumerate(zip(prompts, cpp["prompts"], strict=True)):
        hf_ids = tokenizer(prompt)["input_ids"]
        if cpp_ids != hf_ids:
            at = next((i for i, (a, b) in enumerate(zip(hf_ids, cpp_ids, strict=False)) if a != b),
                      min(len(hf_ids), len(cpp_ids)))
            raise FinetuneError(
                f"{name}: prompt {index} tokenizes differently at token {at} "
                f"(HF {hf_ids[at:at + 3]} vs GGUF {cpp_ids[at:at + 3]})"
            )


@dataclass
class Greedy:
    """The merged model's greedy continuation of one prompt and its logits at every step (on the CPU)."""

    prompt: list[int]
    tokens: list[int]
    logits: list[torch.Tensor]

    def gap(self, at: int, got: int) -> float:
        """How far the HF model's own pick at step ``at`` leads ``got``."""
        step = self.logits[at]
        return float(step[self.tokens[at]] - step[got])


@torch.inference_mode()
def greedy_hf(model, prompt_ids: list[int], max_new: int, eos: set[int]) -> Greedy:
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0], output_logits=True,
                         return_dict_in_generate=True)
    return Greedy(prompt_ids, out.sequences[0, len(prompt_ids):].tolist(), [s[0].float().cpu() for s in out.logits])


def check_generation(cpp_greedy: list[list[int]], finish: dict[str, str], reference: list[Greedy], tokenizer,
                     eos: set[int], name: str, prompts: list[str], tie_tolerance: float = 0.0) -> dict[str, int]:
    """Greedy tokens from llama.cpp (``cpp_greedy``, one list per prompt) equal the HF model's (``reference``).

    Where they part, the HF model's logit for its own token must lead the GGUF's token by no more
    than ``tie_tolerance`` (a numerical tie between f16 and f32 arithmetic); then that prompt's
    comparison ends there. Anything larger fails the stage. Where the HF model stopped at EOS,
    llama.cpp's own completion loop must stop there too (``finish``: its finish reason per prompt
    index). Returns counts: matched, ties, stopped.
    """
    counts = {"matched": 0, "ties": 0, "stopped": 0}
    for index, (prompt, ref, cpp) in enumerate(zip(prompts, reference, cpp_greedy, strict=True)):
        hf = ref.tokens
        if hf != cpp:
            at = next((i for i, (a, b) in enumerate(zip(hf, cpp, strict=False)) if a != b), min(len(hf), len(cpp)))
            both = at < len(hf) and at < len(cpp)
            gap = ref.gap(at, cpp[at]) if both else float("inf")
            if gap <= tie_tolerance:
                counts["ties"] += 1
                continue
            got = tokenizer.decode(cpp[at:at + 1]) if at < len(cpp) else "<end>"
            want = tokenizer.decode(hf[at:at + 1]) if at < len(hf) else "<end>"
            raise FinetuneError(
                f"{name}: greedy output differs from the merged model on prompt {index} "
                f"({prompt[-60:]!r}) at new token {at}: GGUF {got!r} vs HF {want!r} "
                f"(HF logit gap {gap:.4g} > quantize.tie_tolerance {tie_tolerance})"
            )
        counts["matched"] += 1
        if hf and hf[-1] in eos:
            if finish.get(str(index)) != "stop":
                raise FinetuneError(f"{name}: llama.cpp does not stop at EOS on prompt {index} "
                                    f"(finish: {finish.get(str(index))})")
            counts["stopped"] += 1
    return counts


@torch.inference_mode()
def perplexity_hf(model, sequences: list[list[int]]) -> float:
    total, count = 0.0, 0
    for ids in sequences:
        logits = model(torch.tensor([ids], device=model.device)).logits[0, :-1].float().cpu().numpy()
        total += gguf_process.nll(logits, ids[1:])
        count += len(ids) - 1
    return math.exp(total / count)


@dataclass
class Reference:
    """The merged model's side of every check."""

    tokenizer: Any
    prompts: list[str]
    prompt_ids: list[list[int]]
    sequences: list[list[int]]  # perplexity rows: prompt + completion + EOS
    eos: set[int]
    perplexity: float
    greedy: list[Greedy]
    verify_tokens: int

    @property
    def n_ctx(self) -> int:
        """The llama.cpp context every check fits in."""
        return max(len(s) for s in [*self.sequences, *self.prompt_ids]) + self.verify_tokens + 8


def reference(merged_dir: Path, tokenizer, prompts: list[str], texts: list[str], verify_tokens: int) -> Reference:
    """The merged model's perplexity on ``texts`` and greedy continuations of ``prompts`` (float32 arithmetic:
    :func:`finetune.core.inference.reference_model`); the model is freed before this returns."""
    sequences = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    model = inference.reference_model(merged_dir)
    eos = set(inference.eos_ids(model.generation_config.eos_token_id, tokenizer.eos_token_id))
    ppl = perplexity_hf(model, sequences)
    greedy = [greedy_hf(model, ids, verify_tokens, eos) for ids in prompt_ids]
    del model
    inference.release()
    return Reference(tokenizer, prompts, prompt_ids, sequences, eos, ppl, greedy, verify_tokens)


def check_gguf(path: Path, label: str, ref: Reference, threads: int, f16: bool,
               tie_tolerance: float) -> dict[str, Any]:
    """Every check of one file (``f16``: the greedy tokens must match too); what they found, for its metrics."""
    cpp = gguf_process.call("inspect", {
        "path": str(path), "n_ctx": ref.n_ctx, "threads": threads, "specials": specials(ref.tokenizer),
        "prompts": ref.prompts, "prompt_ids": ref.prompt_ids, "max_new": ref.verify_tokens, "eos": sorted(ref.eos),
        "stop_check": [i for i, g in enumerate(ref.greedy) if f16 and g.tokens and g.tokens[-1] in ref.eos],
        "sequences": ref.sequences})
    check_tokenizer(cpp, ref.tokenizer, ref.prompts, label)
    found: dict[str, Any] = {}
    if f16:
        gen = check_generation(cpp["greedy"], cpp["finish"], ref.greedy, ref.tokenizer, ref.eos, label, ref.prompts,
                               tie_tolerance)
        found |= {"greedy_matched": gen["matched"], "greedy_ties": gen["ties"], "stopped_at_eos": gen["stopped"]}
    else:
        found["stopped_at_eos"] = sum(bool(o) and o[-1] in ref.eos for o in cpp["greedy"])
    ppl = cpp["perplexity"]
    if not math.isfinite(ppl):
        raise FinetuneError(f"{label}: perplexity is {ppl}; the file is broken")
    if f16 and abs(ppl / ref.perplexity - 1) > F16_PPL_TOLERANCE:
        raise FinetuneError(f"{label}: perplexity {ppl:.4f} vs {ref.perplexity:.4f} for the merged model "
                            f"(more than {F16_PPL_TOLERANCE:.0%} apart); the conversion is wrong")
    return found | {"perplexity": ppl}

"""lm-eval's ``hf`` model with the work it repeats done once: the same requests, the same scores.

Profiled on the eval suite of llama3-alpaca (ARC-Challenge, MMLU, GSM8K 250: 60,855 log-likelihood
requests; bench/README.md), lm-eval 0.4.13 spent 134 s per model outside the model itself, in two loops:

- prompts (74 s): every document renders through ``jinja2.Environment.from_string``, which parses and
  compiles the same few templates again for each of 82,533 renders (EleutherAI/lm-evaluation-harness#1286).
  :func:`compiled_templates` compiles each template once, in lm-eval's own environment.
- tokenizing (44 s): each request is encoded twice, one string per call. :class:`FastHFLM` encodes them all
  in one batched call of the fast tokenizer first (its Rust threads), with lm-eval's own special-token rule, and
  keeps the ids for the next model with the same tokenizer (the eval stage scores base, fine-tuned, GGUF).

On a GPU, generation (GSM8K) has its own batch: lm-eval's ``auto`` probes rows of the full context with their
full-vocabulary log-softmax (many times the memory a generation needs) and settles at its cap. Here every
generation request goes in one batch (at most inference.GPU_BATCH), halved after an out-of-memory error.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections.abc import Iterator

import numpy as np
import torch
from lm_eval import utils as lm_utils
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix

from finetune.core import inference
from finetune.core.models import space_after_specials

log = logging.getLogger(__name__)


@contextlib.contextmanager
def compiled_templates() -> Iterator[None]:
    """lm-eval's ``apply_template`` with each template compiled once (same environment, filters, output)."""
    original = lm_utils.apply_template
    compile_once = functools.lru_cache(maxsize=4096)(lm_utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compile_once(template).render(**doc)

    lm_utils.apply_template = apply_template
    try:
        yield
    finally:
        lm_utils.apply_template = original


# the ids of every string encoded for the last tokenizer seen, by (string, add_special_tokens): kept across
# models in one process; a different tokenizer (its fingerprint) starts afresh
_ENCODED: dict[str, dict[tuple[str, bool | None], np.ndarray]] = {}


class FastHFLM(HFLM):
    """HFLM whose log-likelihood requests are tokenized in one batch and whose generations batch on their own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        key = self._fingerprint()
        if key not in _ENCODED:
            _ENCODED.clear()
            _ENCODED[key] = {}
        self._encoded = _ENCODED[key]

    def _create_tokenizer(self, *args, **kwargs) -> None:
        """lm-eval's own load (a model it loads itself), then the rule every stage tokenizes by."""
        super()._create_tokenizer(*args, **kwargs)
        space_after_specials(self.tokenizer)

    def _fingerprint(self) -> str:
        """What a token id list depends on: the tokenizer's whole definition and lm-eval's BOS handling."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        definition = backend.to_str() if backend is not None else repr(self.tokenizer)
        extra = repr((self.add_bos_token, self.prefix_token_id, type(self.tokenizer).__name__))
        return hashlib.sha256((definition + extra).encode()).hexdigest()

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        ids = None if kwargs else self._encoded.get((string, add_special_tokens))
        if ids is None:
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        out = ids.tolist()
        return out[-left_truncate_len:] if left_truncate_len else out

    def encode_ahead(self, strings: set[tuple[str, bool | None]]) -> None:
        """Encode what :meth:`tok_encode` will be asked for, grouped by the special-token rule it applies."""
        bos = self.tokenizer.decode(self.prefix_token_id)
        groups: dict[bool | None, list[str]] = {}
        for string, add in strings - self._encoded.keys():
            special = _add_special_kwargs(add, self.add_bos_token)
            if add is None and has_bos_prefix(string, bos):  # tok_encode's rule: no second BOS
                special["add_special_tokens"] = False
            groups.setdefault(special.get("add_special_tokens"), []).append((string, add))
        for flag, items in groups.items():
            kwargs = {} if flag is None else {"add_special_tokens": flag}
            encoded = self.tokenizer([s for s, _ in items], **kwargs)["input_ids"]
            self._encoded.update({item: np.asarray(ids, dtype=np.int64) for item, ids in
                                  zip(items, encoded, strict=True)})

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        """lm-eval's, after encoding every string its ``_encode_pair`` will encode (contexts' trailing spaces
        moved to the continuation, as there)."""
        wanted: set[tuple[str, bool | None]] = set()
        for context, continuation in (req.args for req in requests):
            if context == "":
                wanted.add((continuation, False))
                continue
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            wanted |= {(context + continuation, None), (context, None)}
        self.encode_ahead(wanted)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        if self.batch_size != "auto":
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        size = min(len(requests), inference.GPU_BATCH) or 1
        while True:
            self.batch_size_per_gpu = size
            try:
                return super().generate_until(requests, disable_tqdm=disable_tqdm)
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                size //= 2
                inference.release()
                log.warning("lm-eval generation: out of GPU memory, batch size now %d", size)
            finally:
                self.batch_size_per_gpu = "auto"

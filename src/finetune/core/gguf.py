"""Open and run GGUF files with llama.cpp the same way everywhere (quantize checks, eval, chat, serve).

- names: quantize writes ``<recipe name>-<type>.gguf`` (:func:`gguf_name`); eval, chat and serve read the
  type back with :func:`gguf_type`;
- threads: the cores this process may run on (``os.sched_getaffinity``), unless a number is given;
- GPU: every layer is offloaded (``n_gpu_layers=-1``) when llama.cpp was built with a GPU backend
  (``GGML_CUDA=on``) and sees a device; the CPU build, or a machine without a GPU, keeps them on the CPU;
- :func:`complete`: completions for many prompts; on a GPU they decode side by side in one llama.cpp
  context (one sequence per prompt, up to ``GPU_PARALLEL`` at a time), on the CPU one after another
  through llama-cpp-python's own ``create_completion``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from pathlib import Path

from finetune.core.errors import FinetuneError, one_line
from finetune.core.recipe import available_cores

log = logging.getLogger(__name__)

# Sequences decoded together on a GPU: one decode step costs about the same for 1 or 16 sequences
# (reading the weights dominates), and 16 x 2048 tokens of KV cache stay under 5 GiB at 8B.
GPU_PARALLEL = 16


def gguf_name(name: str, qtype: str) -> str:
    """The file the quantize stage writes for recipe ``name`` and llama.cpp type ``qtype``."""
    return f"{name}-{qtype}.gguf"


def gguf_type(path: str | Path) -> str:
    """The llama.cpp type of a file named by :func:`gguf_name` (a type has no ``-``: ``q4_k_m``)."""
    return Path(path).stem.rsplit("-", 1)[-1]


@functools.cache
def gpu_layers() -> int:
    """``-1`` (all layers on the GPU) where llama.cpp can offload to a device here, else ``0``."""
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        return -1
    if Path("/proc/driver/nvidia/version").exists():  # the driver, asked without torch (gguf_process)
        log.warning("an NVIDIA GPU is present but llama.cpp is the CPU build: GGUF files run on the CPU; "
                    "rebuild llama-cpp-python with `make install GGML_CUDA=on` (the CUDA image does)")
    return 0


def device_name() -> str:
    """Where llama.cpp runs GGUF files here: ``cuda`` (all layers offloaded) or ``cpu``."""
    return "cuda" if gpu_layers() else "cpu"


def llama_settings(threads: int | None = None) -> dict[str, int]:
    """How llama.cpp runs a GGUF here, in-process (:func:`open_gguf`) or as ``finetune serve``'s server:
    ``threads`` (None: every available core) for generation and prompts, all layers on a GPU if any."""
    threads = threads or available_cores()
    return {"n_threads": threads, "n_threads_batch": threads, "n_gpu_layers": gpu_layers()}


def open_gguf(path: str | Path, n_ctx: int, threads: int | None = None, *, logits_all: bool = False, seed: int = 0):
    """A ``llama_cpp.Llama`` for ``path`` with :func:`llama_settings`; a file llama.cpp cannot load is one line."""
    from llama_cpp import Llama

    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, **llama_settings(threads), logits_all=logits_all,
                     verbose=False, seed=seed)
    except ValueError as err:  # llama-cpp-python: "Failed to load model from file: ..."
        raise FinetuneError(f"{path}: llama.cpp cannot load it ({one_line(str(err), 120)}); the file may be "
                            "truncated or not a GGUF: rerun `dvc repro quantize` or fetch it again") from None


def complete(llm, prompts: list[str], max_tokens: int, temperature: float = 0.0, top_p: float = 0.95,
             seed: int = 0, parallel: int | None = None) -> list[str]:
    """One completion per prompt (prompt ``i`` sampled with seed ``seed + i``), stopping at end of generation.

    ``parallel`` sequences decode together (None: ``GPU_PARALLEL`` when the layers are on a GPU, else 1).
    With 1 this is llama-cpp-python's ``create_completion`` per prompt; with more, the same prompt
    tokens, the same sampler chain (greedy at temperature 0) and the same detokenization, batched.
    """
    parallel = parallel or (GPU_PARALLEL if llm.model_params.n_gpu_layers else 1)
    if parallel <= 1 or len(prompts) <= 1:
        return [llm.create_completion(p, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                      seed=seed + i)["choices"][0]["text"] for i, p in enumerate(prompts)]
    return _Parallel(llm, min(parallel, len(prompts))).run(prompts, max_tokens, temperature, top_p, seed)


class _Parallel:
    """Continuous batching over one llama.cpp context with ``n`` sequences (one KV stream each)."""

    def __init__(self, llm, n: int):
        import llama_cpp

        self.lib, self.llm, self.n = llama_cpp, llm, n
        params = type(llm.context_params).from_buffer_copy(llm.context_params)
        params.n_seq_max = n
        params.n_ctx = llm.n_ctx() * n  # each sequence gets the context the Llama object has
        params.kv_unified = False
        self.n_vocab = llm.n_vocab()
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {n} parallel sequences")
        self.batch = llama_cpp.llama_batch_init(max(llm.n_batch, n), 0, 1)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """Decode (token, position, sequence, wants logits) items in one llama_decode call."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed (code {rc})")

    def _prompt_tokens(self, prompt: str) -> list[int]:
        """As create_completion builds them: BOS (or CLS) when the model adds one, the text with specials."""
        llm, model = self.llm, self.llm._model
        cls, sep = model.token_cls(), model.token_sep()
        bos = [cls if cls != -1 else llm.token_bos()]
        if not model.add_bos_token() or bos == [-1]:
            bos = []
        eos = [] if not model.add_eos_token() and sep == -1 else [sep if sep != -1 else llm.token_eos()]
        return bos + llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) + eos

    def _sampler(self, temperature: float, top_p: float, seed: int):
        """create_completion's chain for these defaults: top-k 40, typical 1.0, top-p, min-p 0.05, temp, dist."""
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        for sampler in (lib.llama_sampler_init_top_k(40), lib.llama_sampler_init_typical(1.0, 1),
                        lib.llama_sampler_init_top_p(top_p, 1), lib.llama_sampler_init_min_p(0.05, 1),
                        lib.llama_sampler_init_temp(temperature), lib.llama_sampler_init_dist(seed)):
            lib.llama_sampler_chain_add(chain, sampler)
        return chain

    def _pick(self, index: int, sampler) -> int:
        if sampler is None:  # greedy: the first highest logit, as llama.cpp's greedy sampler
            import numpy as np

            logits = self.lib.llama_get_logits_ith(self.ctx, index)
            return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.n_vocab,))))
        return int(self.lib.llama_sampler_sample(sampler, self.ctx, index))

    def _done(self, slot: dict) -> bool:
        """create_completion's length rule: stop at ``max_tokens``, except while the text ends inside a
        UTF-8 character (it then takes as many more tokens as the character still needs).

        create_completion detokenizes the whole completion at every step to read its last 3 bytes; the same
        bytes come from the last token's piece added to the ones before (O(1) a step, not O(length))."""
        slot["tail"] = (slot["tail"] + self.llm.detokenize(slot["out"][-1:], prev_tokens=slot["prompt"]))[-3:]
        text = slot["tail"]
        for k, char in enumerate(text[-3:]):
            k = 3 - k
            for num, pattern in [(2, 192), (3, 224), (4, 240)]:
                if num > k and pattern & char == pattern:
                    slot["multibyte"] = num - k
        if slot["multibyte"] > 0:
            slot["multibyte"] -= 1
            return False
        return len(slot["out"]) >= slot["max"]

    def run(self, prompts: list[str], max_tokens: int, temperature: float, top_p: float, seed: int) -> list[str]:
        lib, llm = self.lib, self.llm
        vocab, memory = llm._model.vocab, lib.llama_get_memory(self.ctx)
        texts: list[str | None] = [None] * len(prompts)
        slots: dict[int, dict] = {}  # sequence id -> the prompt it is generating for
        todo = list(range(len(prompts)))
        try:
            while todo or slots:
                for seq in [s for s in range(self.n) if s not in slots][:len(todo)]:
                    i = todo.pop(0)
                    ids = self._prompt_tokens(prompts[i])
                    if len(ids) >= llm.n_ctx():
                        raise ValueError(f"Requested tokens ({len(ids)}) exceed context window of {llm.n_ctx()}")
                    lib.llama_memory_seq_rm(memory, seq, -1, -1)
                    for start in range(0, len(ids), llm.n_batch):  # the prompt, logits of its last token
                        chunk = ids[start:start + llm.n_batch]
                        self._decode([(t, start + k, seq, start + k == len(ids) - 1) for k, t in enumerate(chunk)])
                    sampler = self._sampler(temperature, top_p, seed + i) if temperature > 0 else None
                    slots[seq] = {"i": i, "prompt": ids, "out": [], "sampler": sampler, "multibyte": 0, "tail": b"",
                                  "max": min(max_tokens, llm.n_ctx() - len(ids)),
                                  "next": self._pick(len(chunk) - 1, sampler)}
                step = []
                for seq, slot in list(slots.items()):
                    token = slot["next"]
                    if not lib.llama_vocab_is_eog(vocab, token):
                        slot["out"].append(token)
                        if not self._done(slot):
                            step.append((token, len(slot["prompt"]) + len(slot["out"]) - 1, seq, True))
                            continue
                    # finished: end of generation (that token is not part of the text) or the length limit
                    texts[slot["i"]] = llm.detokenize(slot["out"], prev_tokens=slot["prompt"]).decode(
                        "utf-8", errors="ignore")
                    if slot["sampler"] is not None:
                        lib.llama_sampler_free(slot["sampler"])
                    del slots[seq]
                if step:
                    self._decode(step)
                    for index, (_, _, seq, _) in enumerate(step):
                        slots[seq]["next"] = self._pick(index, slots[seq]["sampler"])
        finally:
            for slot in slots.values():
                if slot["sampler"] is not None:
                    lib.llama_sampler_free(slot["sampler"])
            lib.llama_batch_free(self.batch)
            lib.llama_free(self.ctx)
        return [t or "" for t in texts]



# ------------------------------------------------------------------------------------------------
# dequantizing a GGUF for transformers (lm-eval scores a GGUF through transformers' GGUF loading)


class _TypeTraits(ctypes.Structure):
    """ggml.h's ``struct ggml_type_traits`` (llama.cpp pinned by the lock)."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool),
                ("to_float", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)),
                ("from_float_ref", ctypes.c_void_p)]


@functools.cache
def _ggml():
    """llama.cpp's libggml-base (CPU code, no CUDA) alone: importing llama_cpp would load its CUDA
    backend into this process, which already holds torch (finetune.core.gguf_process says why not)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise FinetuneError("llama-cpp-python is not installed; run `make install`")
    lib = ctypes.CDLL(str(Path(list(spec.submodule_search_locations)[0]) / "lib" / "libggml-base.so"))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def dequantize(data, qtype: int, threads: int | None = None):
    """A quantized tensor's rows (uint8, as gguf's reader gives them) -> float32, by llama.cpp's own
    ``to_float`` for the type, rows split over ``threads`` (ctypes lets go of the GIL)."""
    import numpy as np

    traits = _ggml().ggml_get_type_traits(int(qtype)).contents
    rows = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
    per_row = rows.shape[1] // traits.type_size * traits.blck_size
    out = np.empty((rows.shape[0], per_row), dtype=np.float32)
    src = np.ascontiguousarray(rows)

    def run(lo_hi: tuple[int, int]) -> None:
        lo, hi = lo_hi
        traits.to_float(src[lo:hi].ctypes.data, out[lo:hi].ctypes.data, (hi - lo) * per_row)

    n = max(1, min(threads or available_cores(), rows.shape[0]))
    bounds = [(rows.shape[0] * i // n, rows.shape[0] * (i + 1) // n) for i in range(n)]
    if n == 1:
        run(bounds[0])
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(n) as pool:
            list(pool.map(run, bounds))
    return out.reshape(*data.shape[:-1], per_row) if data.ndim > 1 else out.reshape(-1)


@contextlib.contextmanager
def ggml_dequantize():
    """Within: ``gguf.dequantize`` (what transformers' GGUF loading calls per tensor, numpy, one
    thread: ~25 M values/s, minutes at 8B) uses llama.cpp's dequantization on every core for the
    quantized types; float types go through gguf's own."""
    import gguf as gguf_py

    original = gguf_py.dequantize

    def fast(data, qtype):
        if not _ggml().ggml_get_type_traits(int(qtype)).contents.is_quantized:
            return original(data, qtype)
        return dequantize(data, qtype)

    gguf_py.dequantize = fast
    try:
        yield
    finally:
        gguf_py.dequantize = original


# ------------------------------------------------------------------------------------------------
# reading a GGUF's header for transformers once


@functools.cache
def _plain_reader(base: type) -> type:
    """gguf's ``GGUFReader`` over a plain ndarray view of the file instead of the ``np.memmap`` itself.

    The reader slices the file twice per string of every metadata array (a 128,256-token vocabulary
    and 280,147 merges for Llama-3: ~1.9 M slices), and a memmap's ``__getitem__``/``__array_finalize__``
    run in Python for each slice; a plain view of the same pages gives the same parts, 3x faster.
    Read-only files only ('r'), where nothing needs the memmap's ``flush``.
    """
    import numpy as np

    class PlainReader(base):
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) and value.mode == "r" else value

        def _get(self, offset, dtype, count=1, override_order=None):
            count, dt = int(count), np.dtype(dtype)
            arr = self.data[offset:offset + dt.itemsize * count].view(dt)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return PlainReader


_READERS: dict | None = None  # read_once's readers by file identity while a scope is open


@contextlib.contextmanager
def read_once():
    """Within: each GGUF file's header is read once, however often transformers asks.

    Loading a GGUF model and its tokenizer makes transformers parse the whole header four times (the
    config, the weights, the tokenizer's config, the tokenizer; each a minute for Llama-3's vocabulary
    on 2 cores, ~15 s on a GPU host: bench/README.md, run 4) and rebuild gguf's tensor-name map once per
    module (397 times for a 30-layer model). Within, a file is parsed once, 3x faster
    (:func:`_plain_reader`); transformers' metadata-only reads of it (``load_gguf_checkpoint`` without
    tensors) are answered from one, as copies; and the name map is built once per architecture and
    depth. Files are keyed by path, inode, size and mtime, so a rewritten file is read again; the scope
    drops its readers (and their mapping of the file) on exit. Nested scopes share the outermost's.
    """
    global _READERS
    if _READERS is not None:
        yield
        return
    import copy
    import os

    import gguf as gguf_py
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    originals = gguf_py.GGUFReader, gguf_py.get_tensor_name_map, hf_gguf.load_gguf_checkpoint
    metadata: dict = {}

    def identity(path) -> tuple:
        st = os.stat(path)
        return os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns

    def reader(path, mode="r"):
        if mode != "r":
            return originals[0](path, mode)
        key = identity(path)
        if key not in _READERS:
            _READERS[key] = _plain_reader(originals[0])(path)
        return _READERS[key]

    def load_checkpoint(path, return_tensors=False, *args, **kwargs):
        if return_tensors or args or kwargs:
            return originals[2](path, return_tensors, *args, **kwargs)
        key = identity(path)
        if key not in metadata:
            metadata[key] = originals[2](path)
        return copy.deepcopy(metadata[key])  # callers pop and edit what they get

    _READERS = {}
    gguf_py.GGUFReader, hf_gguf.load_gguf_checkpoint = reader, load_checkpoint
    gguf_py.get_tensor_name_map = functools.cache(originals[1])
    try:
        yield
    finally:
        _READERS = None
        gguf_py.GGUFReader, gguf_py.get_tensor_name_map, hf_gguf.load_gguf_checkpoint = originals

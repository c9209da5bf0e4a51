"""HF folder -> GGUF files with llama.cpp's own tools: its converter (to f16), its quantizer (to every other
type, in a process of its own: :mod:`finetune.core.gguf_process`), and what a file holds and will need on disk.
A converter or quantizer that fails on a full disk says so in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from finetune.core import gguf_process
from finetune.core.errors import FinetuneError, one_line

# llama.cpp file types; f16/bf16 come straight from the converter
FTYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
# file bits per weight (llama.cpp's tables, rounded up) to know the disk a stage needs before writing
BITS_PER_WEIGHT = {"f16": 16.0, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_0": 5.5, "q4_k_m": 4.9,
                   "q4_k_s": 4.6, "q4_0": 4.5, "q3_k_m": 3.9, "q2_k": 3.4}


def converter_path() -> Path:
    """llama.cpp's converter, unpacked from the pinned llama-cpp-python sdist by ``make install``."""
    path = Path(os.environ.get("LLAMA_CPP_CONVERTER", Path(sys.prefix) / "llama.cpp" / "convert_hf_to_gguf.py"))
    if not path.is_file():
        raise FinetuneError(f"{path}: llama.cpp's converter is missing; run `make install` "
                            "(or set LLAMA_CPP_CONVERTER)")
    return path


def convert_f16(merged_dir: Path, out_file: Path) -> float:
    """HF folder -> f16 GGUF with llama.cpp's converter; returns seconds."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(converter_path()), str(merged_dir), "--outtype", "f16", "--outfile", str(out_file)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        need = sum(f.stat().st_size for f in merged_dir.glob("*.safetensors"))  # f16 is about bf16's size
        out_file.unlink(missing_ok=True)  # the free space without the partial file
        if "No space left on device" in proc.stderr or "[Errno 28]" in proc.stderr or _free(out_file) < need:
            raise _disk_full(out_file, need)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FinetuneError(f"{merged_dir}: llama.cpp's converter failed ({one_line(last, 200)})")
    return time.perf_counter() - start


def _free(path: Path) -> int:
    return shutil.disk_usage(path.parent).free


def _disk_full(path: Path, need: int) -> FinetuneError:
    return FinetuneError(
        f"{path}: no space left on device ({_free(path) / 2**20:.0f} MiB free on that disk, the file needs up to "
        f"{need / 2**20:.0f} MiB); free disk space and rerun (finished outputs are kept)"
    )


def quantize_file(src: Path, dst: Path, qtype: str, threads: int) -> float:
    """f16 GGUF -> ``qtype`` GGUF through llama.cpp (in its own process); returns seconds."""
    if qtype not in FTYPES:
        raise FinetuneError(f"quantize.types: '{qtype}' is not a llama.cpp type; use one of f16, {', '.join(FTYPES)}")
    request = {"src": str(src), "dst": str(dst), "qtype": qtype, "ftype": FTYPES[qtype], "threads": threads}
    try:
        return gguf_process.call("quantize", request)["seconds"]
    except FinetuneError:
        dst.unlink(missing_ok=True)
        if _free(dst) < src.stat().st_size:  # llama.cpp reports a failed write as a code only
            raise _disk_full(dst, src.stat().st_size) from None
        raise


def tensor_types(path: Path) -> tuple[dict[str, int], int]:
    """How many tensors of each GGML type the file holds, and the total parameter count."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    n_params = 0
    for tensor in GGUFReader(str(path)).tensors:
        name = tensor.tensor_type.name.lower()
        counts[name] = counts.get(name, 0) + 1
        n_params += int(tensor.n_elements)
    return dict(sorted(counts.items())), n_params


def disk_needed(merged_dir: Path, types: list[str]) -> float:
    """Bytes the GGUF files will take: the f16 file (always written first) and every other type."""
    config = json.loads((merged_dir / "config.json").read_text())
    saved = {"float32": 4, "float16": 2, "bfloat16": 2}.get(config.get("dtype") or config.get("torch_dtype"), 2)
    weights = sum(p.stat().st_size for p in merged_dir.glob("*.safetensors")) or \
        sum(p.stat().st_size for p in merged_dir.glob("*.bin"))
    params = weights / saved
    return 1.02 * params / 8 * sum(BITS_PER_WEIGHT[t] for t in {"f16", *types})

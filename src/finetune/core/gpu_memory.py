"""``FINETUNE_GPU_MEMORY_GIB``: run as if the GPU had that much memory.

A stage started with it caps PyTorch's caching allocator at that many GiB
(``torch.cuda.set_per_process_memory_fraction``). Everything that sizes itself to the GPU then sees the smaller
card:

- lm-eval's and our batch searches, which halve on an out-of-memory error;
- the memory planner's ``train.memory_budget_gib: auto`` (:func:`free_bytes`);
- the out-of-memory errors themselves.

So one large card shows what a 24 GB one would do (``bench/pipeline_gpu.py run --gpu-memory-gib 22``), and a
shared card can be split by hand.

llama.cpp runs in a child process with its own CUDA allocations, and those are not capped. The pipeline bench's
NVML peak, which counts the whole card, includes them.
"""

from __future__ import annotations

import os

from finetune.core.errors import FinetuneError

ENV = "FINETUNE_GPU_MEMORY_GIB"
GIB = 2**30


def requested() -> float | None:
    """The cap the environment asks for, in GiB (None: unset or empty)."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    try:
        gib = float(value)
    except ValueError:
        gib = 0.0
    if not gib > 0:
        raise FinetuneError(f"{ENV}={value!r}: expected a positive number of GiB (e.g. 22 for a 24 GB card), "
                            "or unset it to use the whole GPU")
    return gib


def apply_cap() -> float | None:
    """Cap this process's CUDA allocations as :data:`ENV` asks; the cap in GiB, or None (unset, or no GPU)."""
    gib = requested()
    if gib is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total))
    return gib


def free_bytes() -> int:
    """The GPU memory this process can still get: the card's free memory, and no more than the cap leaves over what
    PyTorch already holds."""
    import torch

    free, _ = torch.cuda.mem_get_info()
    gib = requested()
    if gib is None:
        return free
    return max(0, min(free, int(gib * GIB) - torch.cuda.memory_reserved()))

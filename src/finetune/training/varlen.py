"""``attn_implementation="torch_varlen"``: PyTorch's variable-length flash attention for packed rows.

Padding-free packing (TRL) puts a whole batch into one row whose position ids restart at every
document, and hands the model the documents' boundaries (``cu_seq_lens_q/k``, ``max_length_q/k``).
Under sdpa, transformers turns those position ids into a dense block-diagonal mask, so attention
costs (batch tokens)^2 however short the documents are. ``torch.nn.attention.varlen.varlen_attn``
(PyTorch >= 2.10, CUDA) takes the boundaries directly and computes only each document's own
causal triangle. Registered with transformers' attention and mask interfaces; no mask is built.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

NAME = "torch_varlen"


def available() -> bool:
    """CUDA plus a PyTorch that ships ``torch.nn.attention.varlen``."""
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401 -- imported only to learn that it exists
    except ImportError:
        return False
    return True


def kernel():
    """PyTorch's ``varlen_attn`` (a test hands in a reference kernel here: the real one needs CUDA)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


@functools.cache
def _kernel_options(fn) -> tuple[tuple[str, Any], bool]:
    """What this PyTorch release's kernel takes, read once per kernel (not per layer call): the causal
    switch (``is_causal`` or ``window_size=(-1, 0)``) and whether it has ``enable_gqa``."""
    params = inspect.signature(fn).parameters
    causal = ("is_causal", True) if "is_causal" in params else ("window_size", (-1, 0))
    return causal, "enable_gqa" in params


def boundaries(batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """cu_seqlens for unpacked rows without padding: every row is one sequence."""
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device), length


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q/k/v are [batch, heads, seq, dim]; returns [batch, seq, heads, dim]."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("torch_varlen attention takes padding-free batches (no padding mask): "
                         "set train.packing true or train.attention sdpa")
    if dropout:
        raise ValueError("torch_varlen attention has no attention dropout")
    batch, heads, length, dim = query.shape
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None:
        cu_q, max_q = boundaries(batch, length, query.device)
        cu_k, max_k = cu_q, max_q
    else:
        cu_q, cu_k = cu_q.to(query.device, torch.int32), cu_k.to(query.device, torch.int32)
        max_q, max_k = int(kwargs["max_length_q"]), int(kwargs["max_length_k"])
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * key.shape[2], key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * value.shape[2], value.shape[1], dim)
    fn = kernel()
    causal, has_gqa = _kernel_options(fn)
    extra = dict([causal])
    if k.shape[1] != heads:  # grouped-query attention
        if has_gqa:
            extra["enable_gqa"] = True
        else:
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
    if scaling is not None:
        extra["scale"] = scaling
    out = fn(q, k, v, cu_q, cu_k, max_q, max_k, **extra)
    return out.reshape(batch, length, heads, dim), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The kernel masks by document boundaries itself."""
    return None


def register() -> str:
    """Make ``attn_implementation=NAME`` loadable; returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, _no_mask)
    return NAME

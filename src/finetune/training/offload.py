"""Offloaded gradient checkpointing (``train.offload_activations``): a checkpointed layer's input waits in host memory.

Why: this is what lets Unsloth recompute Llama-3-8B in about 8 GiB. With gradient checkpointing a decoder layer
keeps only its input hidden state for backward, which recomputes the rest from it; here that hidden state also
leaves the GPU during forward and comes back for the recompute. That gives back one hidden state per
checkpointed layer per token: ``2 * hidden`` bytes in bf16 (8 KiB per token and layer at Llama-3-8B's 4096,
2 GiB for 32 layers at 4x2048 tokens), for a device-to-host copy in forward and one back in backward.

How: each checkpointed layer's checkpoint function (transformers' ``_gradient_checkpointing_func``, which
``GradientCheckpointingLayer.forward`` calls) runs inside ``torch.autograd.graph.saved_tensors_hooks``. The
non-reentrant checkpoint the Trainer uses (``use_reentrant=False``) saves the layer's positional tensor inputs
(the hidden state) as saved tensors *before* it enters its own hooks, so ours see exactly those; inside, the
checkpoint's own hooks are the innermost and take every other tensor (they keep none of them). In backward the
checkpoint unpacks its inputs (ours copy them back) and recomputes the layer under its recomputation hooks, by
calling the layer's forward directly, not through the checkpoint function: our hooks exist only while the forward
call runs, so nothing is offloaded twice; a checkpoint function called during a backward pass anyway (a layer
recomputed by an outer, reentrant checkpoint) runs without them. Reentrant checkpointing saves the same inputs
through ``ctx.save_for_backward`` and works the same. Layers that keep their activations (``checkpoint_layers``)
never call the function, so their activations stay on the GPU. With ``train.compile`` the function the checkpoint
runs is the layer's compiled forward (:mod:`finetune.training.regional_compile`); checkpoint and hooks stay eager.

On CUDA the copy out goes to pinned host memory on a side stream, without blocking the host, so it overlaps the
layer's compute: the side stream first waits for the compute stream (the input must be written), the input is
marked as used by the side stream (``record_stream``: the allocator gives its memory to no later tensor before the
copy has read it) and an event marks the copy's end. The copy back waits for that event and runs on the compute
stream, which the recompute uses next. transformers' own ``activation_checkpointing_kwargs={"offload": True}``
(``save_on_cpu``) copies out on the compute stream and waits for it there.

On CPU the tensors already live in host memory: the hooks pass them through unchanged (nothing to move);
``COPY_ON_CPU`` makes them copy to new storage and back instead, so CPU tests run the path a GPU takes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

COPY_ON_CPU = False  # tests: on CPU too, pack copies to new storage and unpack copies back (the CUDA path's shape)

_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def _movable(tensor: torch.Tensor) -> bool:
    """A tensor worth sending away: not empty, and not a parameter (the model keeps those anyway)."""
    return tensor.numel() > 0 and not isinstance(tensor, torch.nn.Parameter) and (
        tensor.is_cuda or (COPY_ON_CPU and tensor.device.type == "cpu"))


class OffloadedCheckpoint:
    """A layer's checkpoint function whose saved inputs wait in host memory between forward and backward.

    ``offloaded`` and ``restored`` count the tensors sent away and brought back (tests read them)."""

    def __init__(self, checkpoint: Callable[..., Any]) -> None:
        self.checkpoint = checkpoint
        self.offloaded = 0
        self.restored = 0

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
            return self.checkpoint(function, *args, **kwargs)  # nothing saved, or a recompute inside backward
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            return self.checkpoint(function, *args, **kwargs)

    def pack(self, tensor: torch.Tensor) -> Any:
        if not _movable(tensor):
            return tensor
        self.offloaded += 1
        if not tensor.is_cuda:
            return ("copy", torch.empty_like(tensor).copy_(tensor))
        side = _side_stream(tensor.device)
        side.wait_stream(torch.cuda.current_stream(tensor.device))  # the input is written before it is read
        host = torch.empty_like(tensor, device="cpu", pin_memory=True)
        with torch.cuda.stream(side):
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        tensor.record_stream(side)  # its memory goes to no other tensor before the copy has read it
        return (tensor.device, host, done)

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        self.restored += 1
        if packed[0] == "copy":
            return packed[1].clone()
        device, host, done = packed
        compute = torch.cuda.current_stream(device)
        compute.wait_event(done)  # the copy out has finished writing host
        return host.to(device, non_blocking=True)  # on the compute stream: the recompute waits for it


def install(layers: Iterable[torch.nn.Module]) -> list[OffloadedCheckpoint]:
    """Wrap the checkpoint function of every checkpointed layer among ``layers`` (idempotent); return the wrappers."""
    wrappers = []
    for layer in layers:
        if not getattr(layer, "gradient_checkpointing", False):
            continue
        func = layer._gradient_checkpointing_func
        if not isinstance(func, OffloadedCheckpoint):
            func = layer._gradient_checkpointing_func = OffloadedCheckpoint(func)
        wrappers.append(func)
    return wrappers

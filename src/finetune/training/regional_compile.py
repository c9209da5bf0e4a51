"""Regional ``torch.compile`` (``train.compile``): every decoder layer compiled, not the whole model.

Why: a decoder-only model is one block repeated (32 times in Llama-3-8B). Dynamo keeps compiled code on the
block's code object and the copies share it (their weights are inputs to the graph, not constants), so compiling
each layer costs one block's compile time, not the model's, and the embedding, the loss and PEFT's wrappers stay
eager. ``dynamic=True``: packed, padding-free batches change length every step, and a graph specialised to one
length would recompile at the next.

How, per decoder layer (transformers' ``GradientCheckpointingLayer``):

- a layer that keeps its activations is compiled in place (``nn.Module.compile``: its ``__call__`` runs compiled);
- a checkpointed layer (``gradient_checkpointing``, ``checkpoint_layers``) keeps ``torch.utils.checkpoint`` eager and
  compiles the function the checkpoint runs, the layer's own forward, which runs compiled in forward and in the
  recompute (a compiled function stays compiled in the checkpoint's dynamo-disabled recompute, so it saves the same
  tensors as in forward; the checkpoint's count and shape checks would say otherwise). The checkpoint stays
  outside the compiled region so that it keeps exactly the layer's input, and so that ``offload_activations``'
  saved-tensor hooks can wrap it (dynamo breaks the graph at ``saved_tensors_hooks`` and would run the layer eager).

The fused LoRA forward (``fused_lora``) is installed before and is traced like any other module code. In eval mode
transformers skips the checkpoint and calls a checkpointed layer's forward directly: that layer runs eager there.
With Liger's kernels inside the layers it failed on an H200 (dynamo cannot trace Liger's RMSNorm; Inductor fails on
its SwiGLU kernel), so compiling turns Liger off (:func:`finetune.training.levers.liger_enabled`) and the fused LoRA
uses plain ``silu * up`` under the compiler. Not run on a GPU since, nor under FSDP.
On CPU, inductor builds its kernels with a C++ compiler (``$CXX``, else ``g++``): checked at plan time
(:func:`finetune.training.levers.check_compile`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch

_compiled: dict[Callable[..., Any], Callable[..., Any]] = {}


def compiled(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` under ``torch.compile(dynamic=True)``, one wrapper per function."""
    if function not in _compiled:
        _compiled[function] = torch.compile(function, dynamic=True)
    return _compiled[function]


class CompiledCheckpoint:
    """A layer's checkpoint function that runs the layer's forward compiled: transformers hands it
    ``partial(forward, layer, **kwargs)`` (older releases: ``partial(layer's nn.Module.__call__, **kwargs)``,
    a bound method, compiled as its function with the layer as first argument); anything else runs as given."""

    def __init__(self, checkpoint: Callable[..., Any]) -> None:
        self.checkpoint = checkpoint

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if isinstance(function, functools.partial):
            func, bound = function.func, function.args
            if hasattr(func, "__self__") and hasattr(func, "__func__"):  # a new bound method each call
                func, bound = func.__func__, (func.__self__, *bound)
            function = functools.partial(compiled(func), *bound, **function.keywords)
        return self.checkpoint(function, *args, **kwargs)


def _wrapped(func: Any) -> bool:
    while func is not None:
        if isinstance(func, CompiledCheckpoint):
            return True
        func = getattr(func, "checkpoint", None)  # another wrapper (finetune.training.offload) around it
    return False


def is_compiled(layer: torch.nn.Module) -> bool:
    """Whether :func:`install` compiled ``layer`` (in place, or the forward its checkpoint runs)."""
    return layer._compiled_call_impl is not None or _wrapped(getattr(layer, "_gradient_checkpointing_func", None))


def install(layers: Iterable[torch.nn.Module]) -> int:
    """Compile each decoder layer as its checkpointing asks (set the flags first); return how many changed."""
    count = 0
    for layer in layers:
        if is_compiled(layer):
            continue
        if getattr(layer, "gradient_checkpointing", False):
            layer._gradient_checkpointing_func = CompiledCheckpoint(layer._gradient_checkpointing_func)
        else:
            layer.compile(dynamic=True)
        count += 1
    return count

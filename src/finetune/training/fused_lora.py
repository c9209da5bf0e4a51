"""LoRA layers that add their update inside the adapter's second matmul (``addmm``).

PEFT computes a LoRA layer as ``result + lora_B(lora_A(x)) * scaling`` (and, for 4-bit layers,
clones ``result`` first): besides the two thin matmuls, that is four to five full passes over an
output-sized tensor per layer per step (clone, lora_B's output, the scaling, the sum), and as many
again in backward. ``torch.addmm(result, lora_A(x), B^T, alpha=scaling)`` does the scaling and the
sum in the GEMM's epilogue: one read of ``result``, one write (in place: ``result.addmm_``; out of place, addmm
first copies ``result`` to its output). Same parameters, same adapter files;
the value differs only by rounding (one rounding instead of three). Measured in bench/README.md.

Only the plain case is fused: one active adapter, no dropout, no DoRA/variant, no LoRA bias, not
merged. Anything else (and a dtype mix that autocast would not resolve) takes PEFT's own forward.

In a layer that gradient checkpointing recomputes, the down projection is the layer's last matmul and
nothing in backward needs its output: with a 4-bit base (bitsandbytes keeps the quantized weight on the
autograd context, not among the saved tensors) it computes the LoRA product first and the base matmul
last, so the LoRA product's saved tensors are the layer's last and the non-reentrant checkpoint's early
stop ends the recompute before the base matmul: 27% of a Llama-3-8B layer's matmul work, not done again.
It costs the addmm epilogue there (one more pass over the output); the value is the same sum.

With ``train.fused_lora_groups`` the projections that read the same input one after another (q/k/v, gate/up)
run as one autograd node (:class:`_GroupLinear`): the first to run computes every member's output, with one
``x @ [A_q; A_k; A_v]^T`` for the adapters, and each takes its own. Backward then has one ``dH^T x`` for the A
gradients and chains the input gradient through accumulating GEMMs (``sum g_i W_i + dH A``) where autograd had
a thin matmul per adapter and an elementwise add per base layer and adapter; the same values up to rounding.

SwiGLU MLPs (Llama, Mistral, Qwen: ``down(silu(gate(x)) * up(x))``) whose down projection is such a
layer also stop keeping ``silu(gate) * up`` for backward: ``lora_A`` of the down projection needs it
for its gradient, but it is two elementwise ops away from ``gate`` and ``up``, which backward keeps
anyway, so it is recomputed there. That is a fifth of a decoder layer's saved activations.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Iterable
from typing import Any

import torch

BASE_LAST = True  # the bench: False keeps the addmm order in recomputed layers too, to measure what skipping saves


def _plain(layer: torch.nn.Module) -> bool:
    """A vanilla LoRA layer whose adapters can be folded into one ``addmm``."""
    adapters = list(getattr(layer, "lora_A", {}).keys())
    if len(adapters) != 1 or getattr(layer, "lora_variant", {}):
        return False
    name = adapters[0]
    return (isinstance(layer.lora_dropout[name], torch.nn.Identity)
            and layer.lora_B[name].bias is None
            and isinstance(layer.lora_A[name], torch.nn.Linear))


GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # siblings called in this order on one input


def _is_4bit(base: torch.nn.Module) -> bool:
    """A bitsandbytes 4-bit base layer: its forward keeps the quantized weight on the autograd context, so it saves
    nothing for backward through autograd."""
    return hasattr(getattr(base, "weight", None), "quant_state")


def _base_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's ``[out, in]`` weight in ``dtype``: bitsandbytes' 4-bit one dequantized (as its own
    forward and backward do), a plain one cast."""
    weight = base.weight
    if _is_4bit(base):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.view(-1, 1), weight.quant_state).to(dtype)
    return weight.to(dtype)


class _GroupLinear(torch.autograd.Function):
    """Every member of a :class:`_Group` on one 2-D input: ``y_i = x W_i^T + s_i (x A_i^T) B_i^T``, the A's stacked
    into one matmul. Backward chains the input gradient through one accumulating GEMM per member and one for the
    stacked A's (``grad_x = sum g_i W_i + dH A``, each added in the GEMM's epilogue), where autograd adds the
    members' separate input gradients up with an elementwise add per base layer and adapter. Saves ``x``, the
    stacked A's and ``H``, as the members alone would; the base weights are fetched again in backward (dequantized
    again, as bitsandbytes does), never saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stacked: torch.Tensor, group: _Group, *bs: torch.Tensor):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            x, a = x.to(dtype), stacked.to(dtype)
            h = x @ a.t()
            outs = []
            for member, b in zip(group.members, bs, strict=True):
                lo, hi = group.columns[id(member)]
                y = x @ _base_weight(member.base_layer, dtype).t()
                if member.base_layer.bias is not None:
                    y += member.base_layer.bias.to(dtype)
                outs.append(y.addmm_(h[:, lo:hi], b.to(dtype).t(), alpha=member.scaling[group.name]))
        ctx.save_for_backward(x, a, h, *bs)
        ctx.group, ctx.a_dtype = group, stacked.dtype
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        x, a, h, *bs = ctx.saved_tensors
        group, dtype = ctx.group, x.dtype
        dh, grad_bs, grad_x = [], [], None
        for member, b, g in zip(group.members, bs, grads, strict=True):
            lo, hi = group.columns[id(member)]
            if g is None:  # an output nothing used
                dh.append(h.new_zeros(h.shape[0], hi - lo))
                grad_bs.append(None)
                continue
            scale, g = member.scaling[group.name], g.to(dtype)
            dh.append((g @ b.to(dtype)).mul_(scale))
            grad_bs.append((g.t() @ h[:, lo:hi]).mul_(scale).to(b.dtype))
            weight = _base_weight(member.base_layer, dtype)
            grad_x = g @ weight if grad_x is None else grad_x.addmm_(g, weight)
        dh = torch.cat(dh, dim=1)
        grad_x = dh @ a if grad_x is None else grad_x.addmm_(dh, a)
        return grad_x, (dh.t() @ x).to(ctx.a_dtype), None, *grad_bs


class _Group:
    """Plain LoRA layers that read the same input one after another (q/k/v, gate/up): the first of them to run
    computes every member's output in one :class:`_GroupLinear` and each member takes its own."""

    def __init__(self, members: list[torch.nn.Module], name: str) -> None:
        self.members, self.name = members, name
        ranks = [m.lora_A[name].weight.shape[0] for m in members]
        starts = [sum(ranks[:i]) for i in range(len(ranks))]
        self.columns = {id(m): (lo, lo + r) for m, lo, r in zip(members, starts, ranks, strict=True)}
        self.stacked = 0  # group outputs computed (tests)
        self._x: weakref.ref | None = None  # the input of the outputs held, while members still need them
        self._outs: dict[int, torch.Tensor] = {}

    def _usable(self, name: str) -> bool:
        """Every member on this adapter alone, none merged or disabled, no trainable base bias (not ours to train)."""
        return name == self.name and all(
            not m.disable_adapters and not m.merged and list(m.active_adapters) == [name]
            and (m.base_layer.bias is None or not m.base_layer.bias.requires_grad) for m in self.members)

    def output(self, layer: torch.nn.Module, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """``layer``'s output on ``x`` (None: the group does not apply and the layer computes its own): new outputs
        for every member unless this input's are held and ``layer`` has not taken its own yet."""
        if self._x is None or self._x() is not x or id(layer) not in self._outs:
            if not self._usable(name):
                return None
            stacked = torch.cat([m.lora_A[name].weight for m in self.members])
            flat = x.reshape(-1, x.shape[-1])
            outs = _GroupLinear.apply(flat, stacked, self, *(m.lora_B[name].weight for m in self.members))
            self._outs = {id(m): y.view(*x.shape[:-1], -1) for m, y in zip(self.members, outs, strict=True)}
            self._x = weakref.ref(x)
            self.stacked += 1
        out = self._outs.pop(id(layer))
        if not self._outs:  # every member has its output: hold nothing past this layer
            self._x = None
        return out


def _forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] not in self.lora_A:
        return self._peft_forward(x, *args, **kwargs)  # adapter_names, variant arguments, ...
    name = active[0]
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    autocast = torch.is_autocast_enabled(x.device.type)
    if not autocast and not (x.dtype == a.dtype == b.dtype):
        return self._peft_forward(x, *args, **kwargs)
    if self._group is not None:
        out = self._group.output(self, x, name)
        if out is not None:
            return out
    flat = x.reshape(-1, x.shape[-1])  # the base layer's output comes out 2-D: added to in place, no view
    if self._base_last:
        lora = torch.mm(torch.nn.functional.linear(flat, a), b.t())  # saves h and B: the recompute stops here
        result = self.base_layer(flat)
        return result.add_(lora.to(result.dtype), alpha=self.scaling[name]).view(*x.shape[:-1], -1)
    result = self.base_layer(flat)
    if not autocast and result.dtype != b.dtype:
        return self._peft_forward(x, *args, **kwargs)
    h = torch.nn.functional.linear(flat, a)
    # in place: the out-of-place addmm first copies ``result`` into its output (a device-to-device copy of every
    # projection's output, forward and recompute: 23 ms of a 723 ms step in the bench's profile of ck16-b4)
    out = result.addmm_(h.to(result.dtype), b.to(result.dtype).t(), alpha=self.scaling[name])
    return out.view(*x.shape[:-1], -1)


def _liger_swiglu():
    """Liger's SwiGLU kernels (one pass each way, backward in place), or None off CUDA / without Liger."""
    try:
        from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward
    except ImportError:
        return None
    return swiglu_forward, swiglu_backward


class _SwiGLULoraA(torch.autograd.Function):
    """``p = silu(gate) * up`` and ``h = p @ A^T``, keeping ``gate``, ``up`` and ``A`` (not ``p``) for backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, a: torch.Tensor):
        # inside a compiled layer (train.compile) Inductor fuses silu * up itself, and fails on Liger's own Triton
        # kernel (its post-grad pass over user Triton kernels: bench/train_speed.h200-s7-compile-2.jsonl)
        liger = _liger_swiglu() if gate.is_cuda and not torch.compiler.is_compiling() else None
        with torch.autocast(gate.device.type, enabled=False):
            product = liger[0](gate, up)[2] if liger else torch.nn.functional.silu(gate) * up
            h = product @ a.to(product.dtype).t()
        ctx.save_for_backward(gate, up, a)
        ctx.liger = liger
        return product, h

    @staticmethod
    def backward(ctx, grad_product: torch.Tensor | None, grad_h: torch.Tensor):
        gate, up, a = ctx.saved_tensors
        liger = ctx.liger
        silu = None if liger else torch.nn.functional.silu(gate)
        product = liger[0](gate, up)[2] if liger else silu * up
        w = a.to(product.dtype)
        grad_a = (grad_h.reshape(-1, grad_h.shape[-1]).t() @ product.reshape(-1, product.shape[-1])).to(a.dtype)
        del product
        if grad_product is None:
            grad_p = grad_h @ w
        else:  # added into the down projection's fresh input gradient in place when it is a plain dense one
            grad_p, grad_h = grad_product.reshape(-1, w.shape[1]), grad_h.reshape(-1, w.shape[0])
            grad_p = (grad_p.addmm_(grad_h, w) if grad_product.is_contiguous() else torch.addmm(grad_p, grad_h, w)
                      ).view(gate.shape)
        if liger:  # gradients written over gate and up, which nothing needs any more
            grad_gate, grad_up = liger[1](gate, up, grad_p.view(gate.shape))
            return grad_gate, grad_up, grad_a
        return torch.ops.aten.silu_backward(grad_p * up, gate), grad_p * silu, grad_a


def _swiglu(mlp: torch.nn.Module) -> bool:
    """A gate/up/down SiLU MLP whose down projection is a plain LoRA layer."""
    act = getattr(getattr(mlp, "config", None), "hidden_act", None) or getattr(mlp, "act_fn", None)
    silu = act in ("silu", "swish") or isinstance(act, torch.nn.SiLU)
    return silu and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")) and _plain(mlp.down_proj)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    down = self.down_proj
    active = down.active_adapters
    if down.disable_adapters or down.merged or len(active) != 1 or active[0] not in down.lora_A:
        return self._unfused_forward(x)
    name = active[0]
    gate, up = self.gate_proj(x), self.up_proj(x)
    if torch.is_autocast_enabled(x.device.type):  # what autocast would have made of the down input
        dtype = torch.get_autocast_dtype(x.device.type)
        gate, up = gate.to(dtype), up.to(dtype)
    product, h = _SwiGLULoraA.apply(gate, up, down.lora_A[name].weight)
    result = down.base_layer(product.reshape(-1, product.shape[-1]))  # 2-D, added to in place as in _forward
    b = down.lora_B[name].weight
    with torch.autocast(x.device.type, enabled=False):
        out = result.addmm_(h.reshape(-1, h.shape[-1]).to(result.dtype), b.to(result.dtype).t(),
                            alpha=down.scaling[name])
    return out.view(*product.shape[:-1], -1)


def is_fused(module: torch.nn.Module) -> bool:
    """Whether :func:`install` gave ``module`` (a LoRA layer or a SwiGLU MLP) its fused forward."""
    return getattr(module.forward, "__func__", None) in (_forward, _mlp_forward)


def _groups(model: torch.nn.Module) -> list[_Group]:
    """A group for every set of :data:`GROUPS` siblings that are all plain LoRA layers of one adapter and dtype."""
    groups = []
    for parent in model.modules():
        for names in GROUPS:
            members = [getattr(parent, n, None) for n in names]
            if not all(m is not None and _plain(m) and hasattr(m, "base_layer") for m in members):
                continue
            name = next(iter(members[0].lora_A))  # plain: one adapter each
            if all(name in m.lora_A for m in members) and len({m.lora_A[name].weight.dtype for m in members}) == 1:
                groups.append(_Group(members, name))
    return groups


def install(model: torch.nn.Module, recomputed_mlps: Iterable[torch.nn.Module] = (), groups: bool = False) -> int:
    """Give every plain LoRA layer of ``model`` the fused forward, and every SwiGLU MLP around one the
    recomputed down input, except ``recomputed_mlps`` (those of checkpointed layers, which keep nothing anyway):
    their 4-bit down projections compute the base matmul last instead. ``groups``: q/k/v and gate/up share their
    first matmul (:class:`_Group`). Per instance; returns how many modules changed."""
    count = 0
    keep = {id(m) for m in recomputed_mlps}
    tails = {id(m.down_proj) for m in recomputed_mlps if hasattr(m, "down_proj")}
    for module in list(model.modules()):
        plain = _plain(module) and hasattr(module, "base_layer")
        if plain:  # set again on every install: the layers may change
            module._base_last = BASE_LAST and id(module) in tails and _is_4bit(module.base_layer)
            module._group = None
        if is_fused(module) or id(module) in keep:
            continue  # already ours (another patch, e.g. Liger's at Trainer.train, gets replaced again)
        if plain:
            module._peft_forward = module.forward
            module.forward = types.MethodType(_forward, module)
            count += 1
        elif _swiglu(module):
            module._unfused_forward = module.forward
            module.forward = types.MethodType(_mlp_forward, module)
            count += 1
    for group in _groups(model) if groups else ():
        for member in group.members:
            member._group = group
    return count

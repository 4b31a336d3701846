"""Channel groups of a CNN or MLP, found by tracing it with torch.fx.

Every tensor in the traced graph carries a *channel space*: the channels a producer layer
(Linear or non-grouped Conv) writes. Channel-wise operations (BatchNorm, activations,
pooling, dropout, depthwise convolutions) pass a space on; an element-wise sum or product of
two spaces (a residual connection) merges them into one group; a Linear or Conv reading a
space is a consumer whose input columns belong to the group. Flatten turns each channel into
a contiguous run of features. A space is removable only when every operation that touches it
is one of those; anything else (reshape, concatenation, LayerNorm, the model's output, the
model's input, an operation fx cannot see into) blocks it, and the reason is kept.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .groups import Blocked, Member, UnitGroup, UnitMap

_ACTIVATIONS = tuple(
    getattr(nn, n)
    for n in "ReLU ReLU6 GELU SiLU Sigmoid Tanh Hardswish Hardsigmoid LeakyReLU ELU Mish "
    "Identity Dropout Dropout1d Dropout2d".split()
)
_POOLS = tuple(
    getattr(nn, f"{kind}{d}d")
    for kind in ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool")
    for d in (1, 2, 3)
)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ACT_FUNCS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.gelu,
    F.silu,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.hardswish,
    F.hardsigmoid,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.dropout,
}
_POOL_FUNCS = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool2d,
}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float"}
_BINARY = {
    operator.add,
    operator.iadd,
    operator.mul,
    operator.imul,
    operator.sub,
    torch.add,
    torch.mul,
    torch.sub,
}
_BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub"}
_REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}
_FLATTENS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}


@dataclass
class _Space:
    size: int
    producers: list[str] = field(default_factory=list)
    kind: str = ""
    members: list[Member] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Value:
    space: int
    factor: int  # features per channel (1, or H*W after a flatten)
    channel_last: bool  # channels on the last axis (Linear) or on axis 1 (Conv)


class _Spaces:
    """Union-find over channel spaces."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.data: list[_Space] = []

    def new(self, size: int, reason: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.data.append(_Space(size, reasons=[reason] if reason else []))
        return len(self.parent) - 1

    def root(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def get(self, i: int) -> _Space:
        return self.data[self.root(i)]

    def taint(self, i: int, reason: str) -> None:
        if reason not in self.get(i).reasons:
            self.get(i).reasons.append(reason)

    def union(self, a: int, b: int) -> int:
        ra, rb = self.root(a), self.root(b)
        if ra == rb:
            return ra
        sa, sb = self.data[ra], self.data[rb]
        self.parent[rb] = ra
        sa.producers += sb.producers
        sa.members += sb.members
        sa.reasons += [r for r in sb.reasons if r not in sa.reasons]
        if sa.size != sb.size:
            self.taint(ra, f"an element-wise operation joins {sa.size} and {sb.size} channels")
        sa.kind = "channel" if "channel" in (sa.kind, sb.kind) else sa.kind or sb.kind
        return ra

    def roots(self) -> list[int]:
        return sorted({self.root(i) for i in range(len(self.parent))})


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Tracer:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.spaces = _Spaces()
        self.values: dict[fx.Node, _Value] = {}
        self.out_space: dict[str, int] = {}
        self.in_space: dict[str, int] = {}

    def inputs(self, node: fx.Node) -> list[_Value]:
        found: list[_Value] = []
        fx.node.map_arg(
            (node.args, node.kwargs),
            lambda n: found.append(self.values[n]) if n in self.values else None,
        )
        return found

    def block(self, node: fx.Node, reason: str) -> None:
        for v in self.inputs(node):
            self.spaces.taint(v.space, reason)
        shape = _shape(node)
        if shape is not None:
            self.values[node] = _Value(self.spaces.new(shape[-1] if shape else 1, reason), 1, True)

    def first(self, node: fx.Node) -> _Value | None:
        arg = node.args[0] if node.args else None
        return self.values.get(arg) if isinstance(arg, fx.Node) else None

    def passthrough(self, node: fx.Node, needs_spatial: bool = False) -> None:
        v = self.first(node)
        if v is None:
            return self.block(node, f"{node.target} has no tensor input")
        if needs_spatial and v.channel_last:
            return self.block(node, f"{node.target} pools over the channel axis of a Linear output")
        self.values[node] = v

    def producer(self, node: fx.Node, name: str, mod: nn.Module, channel_last: bool) -> None:
        size = mod.weight.shape[0]
        if name not in self.out_space:
            sid = self.spaces.new(size)
            sp = self.spaces.get(sid)
            sp.producers.append(name)
            sp.kind = "neuron" if channel_last else "channel"
            sp.members.append(Member(f"{name}.weight", 0))
            if mod.bias is not None:
                sp.members.append(Member(f"{name}.bias", 0))
            self.out_space[name] = sid
        self.values[node] = _Value(self.out_space[name], 1, channel_last)

    def consumer(self, node: fx.Node, name: str, v: _Value, channel_last: bool) -> bool:
        if v.channel_last != channel_last and not (self.ndim(node) == 2):
            self.spaces.taint(v.space, f"{name} reads the space on another axis")
            return False
        if name in self.in_space:
            self.spaces.union(self.in_space[name], v.space)
        else:
            self.in_space[name] = v.space
            self.spaces.get(v.space).members.append(Member(f"{name}.weight", 1, v.factor))
        return True

    def ndim(self, node: fx.Node) -> int:
        arg = node.args[0] if node.args else None
        shape = _shape(arg)
        return len(shape) if shape is not None else 0

    def channelwise(
        self,
        node: fx.Node,
        name: str,
        mod: nn.Module,
        params: tuple[str, ...],
        buffers: tuple[str, ...],
    ) -> None:
        v = self.first(node)
        if v is None or v.channel_last and self.ndim(node) > 2:
            return self.block(node, f"{name} is not applied per channel")
        sp = self.spaces.get(v.space)
        for p in params:
            if getattr(mod, p, None) is not None:
                sp.members.append(Member(f"{name}.{p}", 0, v.factor))
        for b in buffers:
            if getattr(mod, b, None) is not None:
                sp.members.append(Member(f"{name}.{b}", 0, v.factor, buffer=True))
        self.values[node] = v

    def call_module(self, node: fx.Node) -> None:
        name = str(node.target)
        mod = self.modules[name]
        v = self.first(node)
        if isinstance(mod, nn.Linear):
            if v is not None:
                self.consumer(node, name, v, True)
            return self.producer(node, name, mod, True)
        if isinstance(mod, _CONVS):
            if mod.groups == 1:
                if v is not None:
                    self.consumer(node, name, v, False)
                return self.producer(node, name, mod, False)
            if (
                mod.groups == mod.in_channels == mod.out_channels
                and v is not None
                and v.factor == 1
            ):
                return self.channelwise(node, name, mod, ("weight", "bias"), ())
            return self.block(
                node,
                f"{name}: grouped convolution (groups={mod.groups}) couples channels in blocks",
            )
        if isinstance(mod, _BATCHNORMS):
            return self.channelwise(
                node, name, mod, ("weight", "bias"), ("running_mean", "running_var")
            )
        if isinstance(mod, _ACTIVATIONS):
            return self.passthrough(node)
        if isinstance(mod, _POOLS):
            return self.passthrough(node, needs_spatial=True)
        if isinstance(mod, nn.Flatten):
            return self.flatten(node, mod.start_dim, mod.end_dim)
        self.block(node, f"{name} ({type(mod).__name__}) is not known to act per channel")

    def flatten(self, node: fx.Node, start: int = 1, end: int = -1) -> None:
        v = self.first(node)
        shape_in, shape_out = _shape(node.args[0]), _shape(node)
        if v is None or shape_in is None or shape_out is None:
            return self.block(node, f"{node.target} on an unknown shape")
        if shape_in == shape_out:
            self.values[node] = v
            return None
        if (
            start == 1
            and end == -1
            and not v.channel_last
            and len(shape_out) == 2
            and shape_out[0] == shape_in[0]
        ):
            per_channel = shape_out[1] // shape_in[1]
            self.values[node] = _Value(v.space, v.factor * per_channel, True)
            return None
        return self.block(node, f"{node.target} reshapes across channels")

    def call_function(self, node: fx.Node) -> None:
        t = node.target
        if t in _ACT_FUNCS or (node.op == "call_method" and t in _ACT_METHODS):
            return self.passthrough(node)
        if t in _POOL_FUNCS:
            return self.passthrough(node, needs_spatial=True)
        if t in _BINARY or (node.op == "call_method" and t in _BINARY_METHODS):
            return self.binary(node)
        if t in _REDUCE_FUNCS or (node.op == "call_method" and t in _REDUCE_METHODS):
            return self.reduce(node)
        if t in _FLATTENS:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return self.flatten(node, start)
        if node.op == "call_method" and t in _FLATTEN_METHODS:
            start = node.args[1] if t == "flatten" and len(node.args) > 1 else 1
            return self.flatten(node, start if t == "flatten" else 1)
        if _shape(node) is None:
            return None  # a size, shape or other non-tensor result: reads no channel
        name = getattr(t, "__name__", str(t))
        self.block(node, f"operation {name} is not known to act per channel")

    def reduce(self, node: fx.Node) -> None:
        v, shape_in, shape_out = self.first(node), _shape(node.args[0]), _shape(node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        if v is None or shape_in is None or shape_out is None or v.channel_last or not dims:
            return self.block(node, f"{node.target} reduces over the channels")
        dims = tuple(d % len(shape_in) for d in dims)
        if 0 in dims or 1 in dims or v.factor != 1:
            return self.block(node, f"{node.target} reduces over the channels")
        self.values[node] = _Value(v.space, 1, len(shape_out) == 2)
        return None

    def binary(self, node: fx.Node) -> None:
        shape = _shape(node)
        vals = []
        for a in node.args[:2]:
            if isinstance(a, fx.Node) and a in self.values:
                sa = _shape(a)
                v = self.values[a]
                axis = -1 if v.channel_last else 1
                if sa is not None and len(sa) == len(shape or ()) and sa[axis] == shape[axis]:
                    vals.append(v)
        if not vals:
            return self.block(node, "an element-wise operation without a channel input")
        for v in vals[1:]:
            if (v.factor, v.channel_last) != (vals[0].factor, vals[0].channel_last):
                self.spaces.taint(v.space, "an element-wise operation joins different layouts")
            self.spaces.union(vals[0].space, v.space)
        self.values[node] = vals[0]

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                shape = _shape(node)
                if shape is not None:
                    self.values[node] = _Value(
                        self.spaces.new(
                            shape[1] if len(shape) > 1 else 1, "it is the model's input"
                        ),
                        1,
                        len(shape) <= 2,
                    )
            elif node.op == "get_attr":
                self.block(node, f"it meets the tensor {node.target} directly")
            elif node.op == "call_module":
                self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.call_function(node)
            elif node.op == "output":
                for v in self.inputs(node):
                    self.spaces.taint(v.space, "it reaches the model's output")

    def unit_map(self) -> UnitMap:
        groups, blocked = [], []
        for r in self.spaces.roots():
            sp = self.spaces.data[r]
            if not sp.producers:
                continue
            if sp.reasons:
                blocked += [Blocked(p, "; ".join(sp.reasons)) for p in sp.producers]
            else:
                groups.append(UnitGroup(sp.producers[0], sp.kind, sp.size, tuple(sp.members)))
        return UnitMap(tuple(groups), tuple(blocked))


def channel_units(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> UnitMap:
    """Trace ``model`` on one example call and return its channel and neuron groups."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, *_CONVS))]
    try:
        gm = fx.symbolic_trace(model)
        example = list(args) + list(kwargs.values())
        with torch.no_grad():
            ShapeProp(gm).propagate(*example)
    except Exception as exc:  # fx cannot see through this model: nothing is proven removable
        reason = f"torch.fx could not trace the model ({type(exc).__name__}: {str(exc)[:200]})"
        return UnitMap((), tuple(Blocked(n, reason) for n in names))
    tracer = _Tracer(gm)
    tracer.run()
    return tracer.unit_map()

"""Channel groups of an ONNX graph: a linear layer's output neurons, followed through
per-channel (elementwise) ops to the linear layers that read them, so that removing a
neuron means removing a column here and a row there, and nothing else changes.

Only what is provably per channel joins a group: elementwise ops whose other inputs are
scalars or per-channel vectors. A neuron read by anything else (a Reshape into attention
heads, a residual Add, a LayerNorm, an If/Loop/Scan body reading it from the outer scope)
keeps the group out, so pruning never changes what a graph computes beyond the removed
neurons themselves.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt
import onnx
from onnx import numpy_helper

__all__ = ["Graph", "Group", "Linear", "find_groups"]

Array = npt.NDArray[Any]

_UNARY = frozenset(
    {"Relu", "LeakyRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid", "Tanh", "Erf", "Gelu",
     "Softplus", "Softsign", "Identity", "Neg", "Abs", "Exp", "Sqrt", "Reciprocal", "Clip"}
)  # fmt: skip
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"})


@dataclass(frozen=True, slots=True)
class Linear:
    """A weight matrix read by a MatMul or Gemm, and which of its axes is which."""

    node: onnx.NodeProto
    weight: str
    in_axis: int  # the axis that meets the layer's input features
    out_axis: int  # the axis that makes its output channels
    bias: str | None  # a per-output vector added right after (Gemm's C, or a following Add)
    # Gemm's C is read by another node too: it may be neither sliced nor refitted here.
    shared_bias: bool = False
    # Gemm computes alpha * A @ B + beta * C: a refit works on the scaled weight and bias.
    alpha: float = 1.0
    beta: float = 1.0


@dataclass(slots=True)
class Group:
    """One prunable set of channels: the producer's outputs and everything reading them."""

    producer: Linear
    channels: int
    vectors: list[str] = field(default_factory=list)  # per-channel constants to slice
    consumers: list[tuple[Linear, str]] = field(default_factory=list)  # (layer, its input)
    outputs: list[str] = field(default_factory=list)  # graph outputs whose width changes


def _outer_reads(node: onnx.NodeProto) -> set[str]:
    """Names that ``node``'s subgraphs (If branches, Loop and Scan bodies, at any depth)
    read from the scope around them: readers the node's own inputs do not list."""
    names: set[str] = set()
    for attr in node.attribute:
        bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for body in bodies:
            inner = {i.name for i in body.input} | {i.name for i in body.initializer}
            inner |= {o for n in body.node for o in n.output}
            for n in body.node:
                names.update(i for i in n.input if i and i not in inner)
                names.update(_outer_reads(n) - inner)
            names.update(o.name for o in body.output if o.name not in inner)
    return names


class Graph:
    """Lookups over one graph: constants (initializers and Constant nodes) and consumers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.initializers = {i.name: i for i in self.graph.initializer}
        self.constant_nodes = {
            n.output[0]: n for n in self.graph.node if n.op_type == "Constant" and n.attribute
        }
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in self.graph.node:
            for index, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, index))
            for name in _outer_reads(node):  # a reader all the same (index -1: no input slot)
                self.consumers[name].append((node, -1))
        self.outputs = {o.name for o in self.graph.output}

    def constant(self, name: str) -> Array | None:
        tensor = self.initializers.get(name)
        node = self.constant_nodes.get(name)
        if tensor is None and node is not None and node.attribute[0].name == "value":
            tensor = node.attribute[0].t
        value: Array | None = numpy_helper.to_array(tensor) if tensor is not None else None
        return value

    def set_constant(self, name: str, value: Array) -> None:
        tensor = numpy_helper.from_array(value.astype(self.constant(name).dtype), name)  # type: ignore[union-attr]
        if name in self.initializers:
            self.initializers[name].CopyFrom(tensor)
        else:
            self.constant_nodes[name].attribute[0].t.CopyFrom(tensor)

    def only_reader(self, name: str, node: onnx.NodeProto) -> bool:
        return name not in self.outputs and all(n is node for n, _ in self.consumers[name])

    def linear(self, node: onnx.NodeProto) -> Linear | None:
        """``node`` as a linear layer over a constant 2-D weight, if it is one."""
        if len(node.input) < 2 or node.input[1] not in self.initializers:
            return None
        weight = self.constant(node.input[1])
        if weight is None or weight.ndim != 2 or weight.dtype.kind != "f":
            return None
        if node.op_type == "MatMul":
            return Linear(node, node.input[1], 0, 1, self._following_bias(node, weight.shape[1]))
        if node.op_type == "Gemm":
            attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
            scales = {a.name: a.f for a in node.attribute if a.type == onnx.AttributeProto.FLOAT}
            alpha, beta = scales.get("alpha", 1.0), scales.get("beta", 1.0)
            if attrs.get("transA", 0) or alpha == 0:
                return None
            trans_b = attrs.get("transB", 0)
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if bias is not None:
                value = self.constant(bias)
                if value is None or value.shape != (weight.shape[1 - trans_b],):
                    return None
            shared = bias is not None and not self.only_reader(bias, node)
            return Linear(
                node, node.input[1], trans_b, 1 - trans_b, None if shared else bias,
                shared_bias=shared, alpha=alpha, beta=beta,
            )  # fmt: skip
        return None

    def _following_bias(self, node: onnx.NodeProto, width: int) -> str | None:
        readers = self.consumers[node.output[0]]
        if len(readers) != 1 or readers[0][0].op_type != "Add":
            return None
        add = readers[0][0]
        other: str = add.input[1 - readers[0][1]]
        value = self.constant(other)
        if value is not None and value.shape == (width,) and self.only_reader(other, add):
            return other
        return None


def _vector_kind(value: Array, channels: int) -> str | None:
    """'scalar' (leave it), 'vector' (slice its last axis) or None (not per channel)."""
    if value.size == 1:
        return "scalar"
    if value.shape[-1] == channels and value.size == channels:
        return "vector"
    return None


def _group(graph: Graph, producer: Linear, keep: Collection[str]) -> Group | None:
    weights = graph.constant(producer.weight)
    assert weights is not None
    if producer.weight in keep or not graph.only_reader(producer.weight, producer.node):
        return None
    if producer.shared_bias:  # slicing it would break its other reader
        return None
    group = Group(producer, int(weights.shape[producer.out_axis]))
    if producer.node.op_type == "Gemm" and producer.bias is not None:
        group.vectors.append(producer.bias)  # a MatMul's bias Add is met below, as a member
    start = producer.node.output[0]
    region, members, taken = {start}, [], set()
    queue = [start]
    while queue:
        tensor = queue.pop()
        if tensor in graph.outputs:
            group.outputs.append(tensor)
        for node, index in graph.consumers[tensor]:
            if id(node) in taken:
                continue
            taken.add(id(node))
            linear = graph.linear(node) if index == 0 else None
            if linear is not None:
                if _in_width(graph, linear) != group.channels:
                    return None
                if not graph.only_reader(linear.weight, node):
                    return None
                group.consumers.append((linear, tensor))
                continue
            if node.op_type not in _UNARY | _BINARY or len(node.output) != 1:
                return None
            members.append(node)
            if node.output[0] not in region:
                region.add(node.output[0])
                queue.append(node.output[0])
    # Every other input of an elementwise member must be a scalar or a per-channel vector
    # that nothing outside the group reads.
    for node in members:
        for index, name in enumerate(node.input):
            if name in region or not name:
                continue
            value = graph.constant(name)
            kind = _vector_kind(value, group.channels) if value is not None else None
            if kind is None or (node.op_type == "Clip" and index and kind != "scalar"):
                return None
            if kind == "vector":
                if not all(id(n) in taken for n, _ in graph.consumers[name]):
                    return None
                if name not in group.vectors:
                    group.vectors.append(name)
    return group if group.consumers else None


def _in_width(graph: Graph, linear: Linear) -> int:
    value = graph.constant(linear.weight)
    assert value is not None
    return int(value.shape[linear.in_axis])


def find_groups(model: onnx.ModelProto, *, keep: Collection[str] = ()) -> list[Group]:
    """Every channel group whose producer weight is not in ``keep``, in graph order."""
    graph = Graph(model)
    groups = []
    for node in graph.graph.node:
        linear = graph.linear(node)
        if linear is None:
            continue
        group = _group(graph, linear, keep)
        if group is not None:
            groups.append(group)
    return groups

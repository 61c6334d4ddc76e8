"""Pruning an ONNX graph's weights to a target sparsity: magnitude (unstructured, zeros in
place: same shapes, same latency) or structured (whole neurons removed, so the matrices and
the latency shrink), with an optional least-squares repair of the layers that read them."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from cloud.pipeline.compress.channels import Graph, Group, find_groups
from cloud.pipeline.evaluate import make_session
from shared.errors import InvalidInput

__all__ = [
    "STATISTICS_BUDGET_BYTES",
    "PruneMethod",
    "Pruned",
    "magnitude_prune",
    "structured_prune",
    "tensor",
]

Array = npt.NDArray[Any]
# The scores' and refit's statistics live in memory all at once, on the API's host: past
# this, structured pruning is refused before collecting rather than exhausting memory.
STATISTICS_BUDGET_BYTES = 1 << 30
_WEIGHT_OPS = {"MatMul": 1, "Gemm": 1, "Conv": 1}  # op -> index of its weight input


class PruneMethod(StrEnum):
    MAGNITUDE = "magnitude"  # the smallest weights of each layer set to zero
    STRUCTURED = "structured"  # the least important neurons of each layer removed


@dataclass(frozen=True, slots=True)
class Pruned:
    model: bytes
    report: dict[str, Any]
    # Zero patterns of the magnitude-pruned tensors (a fine-tune must keep them zero).
    masks: dict[str, Array]


def _check(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise InvalidInput(f"sparsity must be in [0, 1), got {sparsity}")


def _parameters(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer)


def _finish(model: onnx.ModelProto) -> bytes:
    del model.graph.value_info[:]  # shapes inferred before pruning would be stale
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString()
    return data


def magnitude_prune(model: bytes, sparsity: float, *, keep: Collection[str] = ()) -> Pruned:
    """Zero the ``sparsity`` share of smallest-magnitude weights of every weight tensor
    (MatMul, Gemm, Conv) not in ``keep``."""
    _check(sparsity)
    proto = onnx.load_from_string(model)
    graph = Graph(proto)
    names = sorted(
        {
            n.input[i]
            for n in proto.graph.node
            if (i := _WEIGHT_OPS.get(n.op_type)) is not None and len(n.input) > i
        }
        & set(graph.initializers) - set(keep)
    )
    masks: dict[str, Array] = {}
    zeroed = total = 0
    for name in names:
        weight = graph.constant(name)
        assert weight is not None
        if weight.ndim < 2 or weight.dtype.kind != "f":
            continue
        k = int(np.floor(sparsity * weight.size))
        mask = np.ones(weight.shape, dtype=bool)
        if k:
            smallest = np.argpartition(np.abs(weight).reshape(-1), k - 1)[:k]
            mask.reshape(-1)[smallest] = False
        graph.set_constant(name, np.where(mask, weight, 0))
        masks[name] = mask
        zeroed += int((~mask).sum())
        total += weight.size
    if not total:
        raise InvalidInput("the graph has no weight tensors to prune (MatMul, Gemm or Conv)")
    report = {
        "method": PruneMethod.MAGNITUDE.value,
        "sparsity": sparsity,
        "achieved_sparsity": round(zeroed / total, 4),
        "tensors": len(masks),
        "parameters": _parameters(proto),
        "nonzero_parameters": _parameters(proto) - zeroed,
    }
    return Pruned(_finish(proto), report, masks)


class _Statistics:
    """Per group: the Gram matrix [a, 1]^T [a, 1] of what its readers take in, over the
    data (scores need its diagonal; the least-squares repair all of it)."""

    def __init__(self, proto: onnx.ModelProto, groups: list[Group]) -> None:
        widths = {tensor: g.channels for g in groups for _, tensor in g.consumers}
        # float64, (C + 1)^2 each, and a batch's product beside the running sum.
        need = sum(2 * 8 * (c + 1) ** 2 for c in widths.values())
        if need > STATISTICS_BUDGET_BYTES:
            raise InvalidInput(
                f"structured pruning of this graph needs statistics of {need / 1e9:.1f} GB "
                f"({len(widths)} layer inputs, up to {max(widths.values())} neurons wide), over "
                f"the {STATISTICS_BUDGET_BYTES / 1e9:.1f} GB allowed: prune by magnitude instead"
            )
        self.tensors = sorted(widths)
        probe = onnx.ModelProto()
        probe.CopyFrom(proto)
        known = {o.name for o in probe.graph.output}
        for name in self.tensors:
            if name not in known:
                probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        self.session = make_session(probe.SerializeToString())
        self.gram: dict[str, Array] = {}

    def collect(self, inputs: dict[str, Array], batch_size: int = 64) -> None:
        rows = len(next(iter(inputs.values())))
        for start in range(0, rows, batch_size):
            feed = {k: v[start : start + batch_size] for k, v in inputs.items()}
            values = self.session.run(self.tensors, feed)
            for name, value in zip(self.tensors, values, strict=True):
                flat = np.asarray(value, dtype=np.float64).reshape(-1, value.shape[-1])
                flat = np.hstack([flat, np.ones((len(flat), 1))])
                gram = flat.T @ flat
                self.gram[name] = self.gram[name] + gram if name in self.gram else gram


def _importance(graph: Graph, group: Group, stats: _Statistics) -> Array:
    """How much each channel adds to what its readers compute: the root mean square of its
    activation times the norm of the weights that read it (summed over readers)."""
    score = np.zeros(group.channels)
    for linear, tensor in group.consumers:
        gram = stats.gram[tensor]
        rms = np.sqrt(np.maximum(np.diag(gram)[:-1], 0.0) / max(gram[-1, -1], 1.0))
        weight = graph.constant(linear.weight)
        assert weight is not None
        score += rms * np.linalg.norm(linear.alpha * np.moveaxis(weight, linear.in_axis, 0), axis=1)
    return score


def _repair(graph: Graph, group: Group, stats: _Statistics, kept: Array) -> None:
    """Refit each reader's weights (and bias, where it has one) on the kept channels so its
    outputs stay as close as least squares can to the unpruned ones on the data (ridge
    towards the old weights keeps a small sample from overfitting)."""
    for linear, tensor in group.consumers:
        gram = stats.gram[tensor]
        weight = graph.constant(linear.weight)
        assert weight is not None
        # What the layer adds: alpha * W and beta * b (Gemm's scales; 1 for a MatMul).
        w = linear.alpha * np.moveaxis(weight, linear.in_axis, 0).astype(np.float64)  # [in, out]
        bias = graph.constant(linear.bias) if linear.bias is not None and linear.beta else None
        if bias is not None:
            bias = linear.beta * bias.astype(np.float64)
        full = np.vstack([w, bias[None, :] if bias is not None else np.zeros((1, w.shape[1]))])
        rows = np.append(kept, group.channels) if bias is not None else kept
        lhs = gram[np.ix_(rows, rows)]
        ridge = 1e-3 * float(np.mean(np.diag(lhs))) + 1e-12
        rhs = gram[rows, :] @ full + ridge * full[rows]
        solved = np.linalg.solve(lhs + ridge * np.eye(len(rows)), rhs)
        new_w = solved[: len(kept)] / linear.alpha
        graph.set_constant(linear.weight, np.moveaxis(new_w, 0, linear.in_axis))
        if bias is not None and linear.bias is not None:
            graph.set_constant(linear.bias, solved[-1] / linear.beta)


def _cut(graph: Graph, group: Group, kept: Array, *, readers: bool) -> None:
    producer = group.producer
    weight = graph.constant(producer.weight)
    assert weight is not None
    graph.set_constant(producer.weight, np.take(weight, kept, axis=producer.out_axis))
    for name in group.vectors:
        value = graph.constant(name)
        assert value is not None
        graph.set_constant(name, np.take(value, kept, axis=-1))
    for linear, _tensor in group.consumers if readers else ():
        value = graph.constant(linear.weight)
        assert value is not None
        graph.set_constant(linear.weight, np.take(value, kept, axis=linear.in_axis))
    for output in graph.graph.output:
        if output.name in group.outputs:
            dims = output.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value"):
                dims[-1].dim_value = len(kept)


def structured_prune(
    model: bytes,
    sparsity: float,
    inputs: dict[str, Array],
    *,
    keep: Collection[str] = (),
    repair: bool = False,
) -> Pruned:
    """Remove the ``sparsity`` share of least important neurons from every channel group
    (see :mod:`channels`), scored on ``inputs``; ``repair`` refits the readers after."""
    _check(sparsity)
    proto = onnx.load_from_string(model)
    groups = find_groups(proto, keep=keep)
    if not groups:
        raise InvalidInput(
            "the graph has no neurons that can be removed whole (a MatMul/Gemm layer read "
            "only through elementwise ops by other MatMul/Gemm layers)"
        )
    stats = _Statistics(proto, groups)
    stats.collect(inputs)
    graph = Graph(proto)
    before = _parameters(proto)
    # Scores first, from the unpruned weights: cutting one group changes another's readers.
    plans = []
    for group in groups:
        score = _importance(graph, group, stats)
        keep_count = max(1, group.channels - round(sparsity * group.channels))
        plans.append((group, np.sort(np.argsort(-score, kind="stable")[:keep_count])))
    for group, kept in plans:
        if repair:
            _repair(graph, group, stats, kept)  # writes the readers' kept rows itself
        _cut(graph, group, kept, readers=not repair)
    total = sum(g.channels for g in groups)
    removed = sum(g.channels - len(kept) for g, kept in plans)
    report = {
        "method": PruneMethod.STRUCTURED.value,
        "sparsity": sparsity,
        "achieved_sparsity": round(removed / total, 4),
        "groups": [
            {"layer": g.producer.weight, "channels": g.channels, "kept": len(kept)}
            for g, kept in plans
        ],
        "parameters_before": before,
        "parameters": _parameters(proto),
        "repaired": repair,
    }
    return Pruned(_finish(proto), report, {})


def tensor(model: bytes, name: str) -> Array:
    """One initializer of ``model`` as an array (tests and reports look at weights)."""
    for init in onnx.load_from_string(model).graph.initializer:
        if init.name == name:
            value: Array = numpy_helper.to_array(init)
            return value
    raise InvalidInput(f"no initializer {name!r}")

"""A numpy MLP in the edge models' ONNX layout: read from and written to ONNX, trained with
Adam on hard labels and on a teacher's temperature-softened outputs (no torch)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from cloud.pipeline.reference import graphs
from cloud.pipeline.reference.graphs import HEAD_BIAS, HEAD_WEIGHT
from shared.errors import InvalidInput

__all__ = ["Mlp", "StudentArch", "TrainOptions", "softened", "train"]

Array = npt.NDArray[Any]
_ARCH = re.compile(r"^mlp:(\d{1,4}(?:,\d{1,4}){0,3})(?::pool([24]))?$")
MAX_UNITS = 1024


@dataclass(frozen=True, slots=True)
class StudentArch:
    """``mlp:64,32`` (hidden sizes; the last is the embedding) or ``mlp:32,16:pool2`` (the
    input average-pooled first, as the weak edge model does)."""

    hidden: tuple[int, ...]
    pool: int | None = None

    @classmethod
    def parse(cls, text: str) -> StudentArch:
        match = _ARCH.match(text)
        if match is None:
            raise InvalidInput(
                f"student architecture {text[:40]!r} must look like mlp:64,32 or mlp:32,16:pool2 "
                "(1 to 4 hidden layers)"
            )
        hidden = tuple(int(h) for h in match.group(1).split(","))
        if not all(1 <= h <= MAX_UNITS for h in hidden):
            raise InvalidInput(f"hidden layers need 1 to {MAX_UNITS} units, got {list(hidden)}")
        return cls(hidden, int(match.group(2)) if match.group(2) else None)

    def __str__(self) -> str:
        return "mlp:" + ",".join(map(str, self.hidden)) + (f":pool{self.pool}" if self.pool else "")


@dataclass(frozen=True, slots=True)
class TrainOptions:
    epochs: int = 60
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    # Loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels, student):
    # T^2 keeps the soft term's gradients on the hard term's scale (Hinton et al., 2015).
    temperature: float = 4.0
    alpha: float = 0.7
    seed: int = 0


def _pooled(x: Array, pool: int) -> Array:
    side = round(x.shape[1] ** 0.5)
    cells = side // pool
    pooled: Array = x.reshape(-1, cells, pool, cells, pool).mean(axis=(2, 4))
    return pooled.reshape(-1, cells * cells)


def softened(probabilities: Array, temperature: float) -> Array:
    """softmax(log p / T): a teacher's probabilities at temperature T."""
    logits = np.log(np.clip(probabilities.astype(np.float64), 1e-12, 1.0)) / temperature
    return _softmax(logits)


def _softmax(logits: Array) -> Array:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    result: Array = e / e.sum(axis=1, keepdims=True)
    return result


@dataclass(frozen=True, slots=True)
class Mlp:
    """x * scale [-> avg-pool] -> (dense + ReLU)* -> embedding -> head -> softmax."""

    layers: tuple[tuple[Array, Array], ...]  # (W [in, out], b [out]); the last: embedding
    head: tuple[Array, Array]
    scale: float
    pool: int | None
    features: int

    @classmethod
    def init(
        cls, arch: StudentArch, *, features: int, classes: int, scale: float, seed: int
    ) -> Mlp:
        rng = np.random.default_rng(seed)
        width = features // (arch.pool * arch.pool) if arch.pool else features
        sizes = [width, *arch.hidden]

        def dense(n_in: int, n_out: int) -> tuple[Array, Array]:
            w = rng.normal(0.0, np.sqrt(2.0 / n_in), (n_in, n_out))  # He: ReLU layers
            return w, np.zeros(n_out)

        layers = tuple(dense(a, b) for a, b in itertools.pairwise(sizes))
        return cls(layers, dense(sizes[-1], classes), scale, arch.pool, features)

    @property
    def arch(self) -> StudentArch:
        return StudentArch(tuple(w.shape[1] for w, _ in self.layers), self.pool)

    @property
    def parameters(self) -> int:
        return sum(w.size + b.size for w, b in (*self.layers, self.head))

    def _inputs(self, x: Array) -> Array:
        scaled = np.asarray(x, dtype=np.float64) * self.scale
        return _pooled(scaled, self.pool) if self.pool else scaled

    def forward(self, x: Array) -> tuple[list[Array], Array]:
        """Every layer's input (the last: the embedding) and the logits."""
        seen = [self._inputs(x)]
        for w, b in self.layers:
            seen.append(np.maximum(seen[-1] @ w + b, 0.0))
        return seen, seen[-1] @ self.head[0] + self.head[1]

    def probabilities(self, x: Array) -> Array:
        return _softmax(self.forward(x)[1])

    def to_onnx(self, name: str, *, input_name: str = "input") -> bytes:
        f32 = [(w.astype(np.float32), b.astype(np.float32)) for w, b in self.layers]
        head = (self.head[0].astype(np.float32), self.head[1].astype(np.float32))
        data = graphs.mlp_classifier(
            hidden=f32, head=head, features=self.features, pool=self.pool, scale=self.scale,
            name=name,
        )  # fmt: skip
        if input_name == "input":
            return data
        # The student answers under its teacher's input name, so one request fits both.
        model = onnx.load_from_string(data)
        model.graph.input[0].name = input_name
        for node in model.graph.node:
            node.input[:] = [input_name if i == "input" else i for i in node.input]
        onnx.checker.check_model(model, full_check=True)
        renamed: bytes = model.SerializeToString()
        return renamed

    @classmethod
    def from_onnx(cls, model: bytes) -> Mlp:
        """The MLP behind ``model``; InvalidInput unless the graph is exactly the edge layout
        (rebuilt from its weights, it gives the same nodes)."""
        graph = onnx.load_from_string(model).graph
        weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        layers: list[tuple[Array, Array]] = []
        while f"layer{len(layers)}.weight" in weights:
            i = len(layers)
            layers.append((weights[f"layer{i}.weight"], weights[f"layer{i}.bias"]))
        pools = [n for n in graph.node if n.op_type == "AveragePool"]
        kernel = [a.ints[0] for p in pools for a in p.attribute if a.name == "kernel_shape"]
        pool = int(kernel[0]) if kernel else None
        dims = graph.input[0].type.tensor_type.shape.dim if graph.input else []
        try:
            mlp = cls(
                tuple(layers),
                (weights[HEAD_WEIGHT], weights[HEAD_BIAS]),
                float(weights["scale"]),
                pool,
                int(dims[1].dim_value),
            )
            rebuilt = onnx.load_from_string(
                mlp.to_onnx("check", input_name=graph.input[0].name)
            ).graph
        except Exception as exc:  # missing tensors, odd shapes, or onnx's checker's own types
            raise _not_mlp() from exc
        if not layers or _shape_of(rebuilt) != _shape_of(graph):
            raise _not_mlp()
        return mlp


def _shape_of(graph: onnx.GraphProto) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    return [(n.op_type, tuple(n.input), tuple(n.output)) for n in graph.node]


def _not_mlp() -> InvalidInput:
    return InvalidInput(
        "this graph is not in the edge MLP layout (scale, Gemm+Relu layers, head.weight/"
        "head.bias, Softmax): training it needs that layout"
    )


def train(
    mlp: Mlp,
    x: Array,
    labels: Array,
    *,
    teacher: Array | None = None,
    options: TrainOptions = TrainOptions(),
    masks: Mapping[str, Array] | None = None,
) -> Mlp:
    """``mlp`` trained with Adam on ``labels`` and, where given, the ``teacher``'s
    probabilities on the same rows (softened at ``options.temperature``). ``masks`` (by
    initializer name, e.g. ``layer0.weight``) hold pruned weights at zero."""
    alpha = options.alpha if teacher is not None else 0.0
    soft = softened(teacher, options.temperature) if teacher is not None else None
    classes = mlp.head[0].shape[1]
    onehot = np.eye(classes)[labels]
    params = [a.astype(np.float64).copy() for pair in (*mlp.layers, mlp.head) for a in pair]
    names = [f"layer{i}.weight" for i in range(len(mlp.layers))] + [HEAD_WEIGHT]
    fixed = [(2 * i, masks[n]) for i, n in enumerate(names) if masks and n in masks]
    first = [np.zeros_like(p) for p in params]
    second = [np.zeros_like(p) for p in params]
    rng = np.random.default_rng(options.seed)
    inputs = mlp._inputs(x)
    step = 0
    b1, b2, eps = 0.9, 0.999, 1e-8
    for _ in range(options.epochs):
        order = rng.permutation(len(inputs))
        for start in range(0, len(order), options.batch_size):
            rows = order[start : start + options.batch_size]
            grads = _gradients(params, inputs[rows], onehot[rows], soft, rows, alpha, options)
            step += 1
            for p, g, m, v in zip(params, grads, first, second, strict=True):
                g = g + options.weight_decay * p
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * g * g
                p -= (
                    options.learning_rate
                    * (m / (1 - b1**step))
                    / (np.sqrt(v / (1 - b2**step)) + eps)
                )
            for index, mask in fixed:
                params[index] *= mask
    pairs = [(params[i], params[i + 1]) for i in range(0, len(params), 2)]
    return replace(mlp, layers=tuple(pairs[:-1]), head=pairs[-1])


def _gradients(
    params: list[Array],
    x: Array,
    onehot: Array,
    soft: Array | None,
    rows: Array,
    alpha: float,
    options: TrainOptions,
) -> list[Array]:
    seen = [x]
    for i in range(0, len(params) - 2, 2):
        seen.append(np.maximum(seen[-1] @ params[i] + params[i + 1], 0.0))
    logits = seen[-1] @ params[-2] + params[-1]
    # d/dz of T^2 KL(q || softmax(z/T)) is T (softmax(z/T) - q); of CE it is softmax(z) - y.
    delta = (1 - alpha) * (_softmax(logits) - onehot)
    if soft is not None and alpha > 0:
        t = options.temperature
        delta = delta + alpha * t * (_softmax(logits / t) - soft[rows])
    delta = delta / len(x)
    grads: list[Array] = []
    for i in range(len(params) - 2, -1, -2):
        grads[:0] = [seen[i // 2].T @ delta, delta.sum(axis=0)]
        if i:
            delta = (delta @ params[i].T) * (seen[i // 2] > 0)
    return grads

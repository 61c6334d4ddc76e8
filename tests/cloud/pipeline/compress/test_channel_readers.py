"""Structured pruning only where every reader of what it changes is known: a bias tensor
shared by another layer, a subgraph (If/Loop/Scan body) reading a neuron or a weight from
the outer scope, and a Gemm's alpha/beta scaling are each either accounted for or keep the
group out, so pruning never silently changes what the rest of the graph computes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloud.pipeline.compress.channels import find_groups
from cloud.pipeline.compress.prune import structured_prune, tensor
from cloud.pipeline.evaluate import run_model
from shared.errors import InvalidInput

WIDTH, HIDDEN = 8, 32
_RNG = np.random.default_rng(0)
TRAIN = {"x": _RNG.normal(size=(400, WIDTH)).astype(np.float32)}
TEST = {"x": _RNG.normal(size=(50, WIDTH)).astype(np.float32)}


def _init(name: str, shape: tuple[int, ...], seed: int) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)


def _model(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], outputs: dict[str, list[object]]
) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _groups(model: bytes) -> list[tuple[str, int]]:
    return [(g.producer.weight, g.channels) for g in find_groups(onnx.load_from_string(model))]


def test_a_shared_gemm_bias_keeps_its_group_out() -> None:
    """(a) The reader Gemm's bias b2 is also an unrelated Gemm's bias: the refit may not
    rewrite it, so y2 stays exactly as it was. (b) The producer Gemm's bias b1 is also read
    by another Gemm: slicing it would break that layer, so w1 makes no group."""
    reader_shared = _model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["p"]),
            helper.make_node("Relu", ["p"], ["h"]),
            helper.make_node("Gemm", ["h", "w2", "b2"], ["y"]),
            helper.make_node("Gemm", ["x", "w3", "b2"], ["y2"]),
        ],
        [_init("w1", (WIDTH, HIDDEN), 1), _init("b1", (HIDDEN,), 2),
         _init("w2", (HIDDEN, 4), 3), _init("b2", (4,), 4), _init("w3", (WIDTH, 4), 5)],
        {"y": ["N", 4], "y2": ["N", 4]},
    )  # fmt: skip
    assert _groups(reader_shared) == [("w1", HIDDEN)]
    pruned = structured_prune(reader_shared, 0.5, TRAIN, repair=True)
    assert tensor(pruned.model, "w1").shape == (WIDTH, HIDDEN // 2)
    np.testing.assert_array_equal(tensor(pruned.model, "b2"), tensor(reader_shared, "b2"))
    np.testing.assert_array_equal(
        run_model(pruned.model, TEST, output="y2"), run_model(reader_shared, TEST, output="y2")
    )

    producer_shared = _model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["p"]),
            helper.make_node("Relu", ["p"], ["h"]),
            helper.make_node("Gemm", ["h", "w2", "b2"], ["y"]),
            helper.make_node("Gemm", ["x", "w3", "b1"], ["y2"]),
        ],
        [_init("w1", (WIDTH, HIDDEN), 1), _init("b1", (HIDDEN,), 2),
         _init("w2", (HIDDEN, 4), 3), _init("b2", (4,), 4), _init("w3", (WIDTH, HIDDEN), 5)],
        {"y": ["N", 4], "y2": ["N", HIDDEN]},
    )  # fmt: skip
    assert _groups(producer_shared) == []
    with pytest.raises(InvalidInput, match="no neurons that can be removed whole"):
        structured_prune(producer_shared, 0.5, TRAIN)


def _branch(name: str, node: onnx.NodeProto) -> onnx.GraphProto:
    out = node.output[0]
    return helper.make_graph(
        [node], name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)]
    )


def test_neurons_read_inside_a_subgraph_are_not_pruned() -> None:
    """An If branch sums the hidden neurons h (read from the outer scope), or reads the
    producer's weight w1 itself: either way the group is out, and pruning is refused with
    the reason rather than changing what the branch computes."""
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    cond = numpy_helper.from_array(np.array(True), "cond")
    for read in ("h", "w1"):
        then = _branch("then", helper.make_node("ReduceSum", [read, "axes"], ["s1"], keepdims=0))
        other = _branch("else", helper.make_node("ReduceSum", [read, "axes"], ["s2"], keepdims=0))
        model = _model(
            [
                helper.make_node("Gemm", ["x", "w1", "b1"], ["p"]),
                helper.make_node("Relu", ["p"], ["h"]),
                helper.make_node("Gemm", ["h", "w2", "b2"], ["y"]),
                helper.make_node("If", ["cond"], ["s"], then_branch=then, else_branch=other),
            ],
            [_init("w1", (WIDTH, HIDDEN), 1), _init("b1", (HIDDEN,), 2),
             _init("w2", (HIDDEN, 4), 3), _init("b2", (4,), 4), cond, axes],
            {"y": ["N", 4], "s": [None]},
        )  # fmt: skip
        assert _groups(model) == [], read
        with pytest.raises(InvalidInput, match="no neurons that can be removed whole"):
            structured_prune(model, 0.5, TRAIN, repair=True)


def _gemm_ffn(alpha: float, beta: float) -> bytes:
    """x -> Gemm -> Relu -> Gemm(alpha, beta) -> y, with the second layer's weight and bias
    divided by alpha and beta: the same function whatever they are."""
    w2, b2 = _init("w2", (HIDDEN, 4), 3), _init("b2", (4,), 4)
    scaled_w2 = numpy_helper.from_array(numpy_helper.to_array(w2) / np.float32(alpha), "w2")
    scaled_b2 = numpy_helper.from_array(numpy_helper.to_array(b2) / np.float32(beta), "b2")
    return _model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["p"]),
            helper.make_node("Relu", ["p"], ["h"]),
            helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], alpha=alpha, beta=beta),
        ],
        [_init("w1", (WIDTH, HIDDEN), 1), _init("b1", (HIDDEN,), 2), scaled_w2, scaled_b2],
        {"y": ["N", 4]},
    )


@pytest.mark.parametrize(("alpha", "beta"), [(4.0, 1.0), (0.5, 2.0), (1.0, 0.25)])
def test_a_gemm_reader_is_repaired_the_same_whatever_its_alpha_and_beta(
    alpha: float, beta: float
) -> None:
    """The least-squares refit works on what the reader computes (alpha * A @ B + beta * C),
    so equivalent graphs get the same pruned function."""
    plain, scaled = _gemm_ffn(1.0, 1.0), _gemm_ffn(alpha, beta)
    np.testing.assert_allclose(
        run_model(scaled, TEST, output="y"), run_model(plain, TEST, output="y"), rtol=1e-5,
        atol=1e-5,
    )  # fmt: skip
    expected = run_model(structured_prune(plain, 0.5, TRAIN, repair=True).model, TEST, output="y")
    pruned = structured_prune(scaled, 0.5, TRAIN, repair=True)
    np.testing.assert_allclose(run_model(pruned.model, TEST, output="y"), expected, atol=1e-4)


def test_structured_pruning_refuses_when_statistics_exceed_budget() -> None:
    """Scores and refit need a float64 Gram matrix of (channels + 1)^2 per group, for all
    groups at once: a layer 12,000 neurons wide would take over 2 GB while collecting.
    Refused (InvalidInput, a 400) with the figures, before any data runs through it."""
    wide = 12_000
    model = _model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        [_init("w1", (WIDTH, wide), 1), _init("w2", (wide, 4), 2)],
        {"y": ["N", 4]},
    )
    assert _groups(model) == [("w1", wide)]
    with pytest.raises(InvalidInput, match=r"statistics of 2\.3 GB .* over the 1\.1 GB"):
        structured_prune(model, 0.5, TRAIN)

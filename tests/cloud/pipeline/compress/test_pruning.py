"""Pruning on the graph: magnitude zeros weights in place; structured pruning removes whole
neurons (smaller matrices) only where nothing but per-channel ops and linear layers read
them, including a transformer's GELU feed-forward block, which a least-squares refit
repairs. No torch needed: the feed-forward block is built here with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloud.pipeline.compress.channels import find_groups
from cloud.pipeline.compress.prune import magnitude_prune, structured_prune, tensor
from cloud.pipeline.evaluate import accuracy, run_model
from cloud.pipeline.reference.digits import digits_splits
from cloud.pipeline.reference.graphs import HEAD_BIAS, HEAD_WEIGHT
from shared.errors import InvalidInput

HEAD = [HEAD_WEIGHT, HEAD_BIAS]
WIDTH, HIDDEN = 8, 32


def _ffn(*, into_reshape: bool = False, seed: int = 0) -> bytes:
    """x -> MatMul -> Add bias -> GELU (as torch exports it: Div, Erf, Add, Mul, Mul, with
    Constant nodes) -> MatMul -> Add bias -> + x (residual) -> y. ``into_reshape``: the
    hidden activations also feed a Reshape, which makes them unprunable."""
    rng = np.random.default_rng(seed)

    def init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)

    def const(name: str, value: float) -> onnx.NodeProto:
        return helper.make_node(
            "Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.float32))
        )

    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["b1", "h0"], ["h1"]),
        const("sqrt2", 1.4142135),
        helper.make_node("Div", ["h1", "sqrt2"], ["h2"]),
        helper.make_node("Erf", ["h2"], ["h3"]),
        const("one", 1.0),
        helper.make_node("Add", ["h3", "one"], ["h4"]),
        helper.make_node("Mul", ["h1", "h4"], ["h5"]),
        const("half", 0.5),
        helper.make_node("Mul", ["h5", "half"], ["gelu"]),
        helper.make_node("MatMul", ["gelu", "w2"], ["o0"]),
        helper.make_node("Add", ["b2", "o0"], ["o1"]),
        helper.make_node("Add", ["o1", "x"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])]
    inits = [init("w1", (WIDTH, HIDDEN)), init("b1", (HIDDEN,)), init("w2", (HIDDEN, WIDTH)),
             init("b2", (WIDTH,))]  # fmt: skip
    if into_reshape:
        inits.append(numpy_helper.from_array(np.array([-1, 4, HIDDEN // 4]), "shape"))
        nodes.append(helper.make_node("Reshape", ["gelu", "shape"], ["heads"]))
        outputs.append(helper.make_tensor_value_info("heads", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        outputs, inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _accuracy(model: bytes) -> float:
    s = digits_splits(0)
    return accuracy(run_model(model, {"input": s.x_test}, output="probabilities"), s.y_test)


def test_magnitude_pruning_zeros_the_smallest_weights_and_leaves_the_head(
    reference_onnx: dict[str, bytes],
) -> None:
    edge = reference_onnx["digits-edge"]
    pruned = magnitude_prune(edge, 0.5, keep=HEAD)
    assert pruned.report["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    for name in ("layer0.weight", "layer1.weight"):
        before, after = tensor(edge, name), tensor(pruned.model, name)
        assert after.shape == before.shape
        assert (after == 0).mean() == pytest.approx(0.5, abs=0.01)
        # What survived is the largest half, untouched.
        kept = after != 0
        assert np.abs(before[kept]).min() >= np.abs(before[~kept]).max()
        np.testing.assert_array_equal(after[kept], before[kept])
    np.testing.assert_array_equal(tensor(pruned.model, HEAD_WEIGHT), tensor(edge, HEAD_WEIGHT))
    assert _accuracy(pruned.model) > 0.9


def test_structured_pruning_shrinks_the_matrices_of_the_edge_mlp(
    reference_onnx: dict[str, bytes],
) -> None:
    """Half the neurons of both hidden layers go: 64x64 -> 64x32, 64x32 -> 32x16, and the
    head reads a 16-wide embedding. The file is smaller and the graph still runs."""
    edge = reference_onnx["digits-edge"]
    s = digits_splits(0)
    pruned = structured_prune(edge, 0.5, {"input": s.x_train}, keep=HEAD)
    assert tensor(pruned.model, "layer0.weight").shape == (64, 32)
    assert tensor(pruned.model, "layer1.weight").shape == (32, 16)
    assert tensor(pruned.model, "layer1.bias").shape == (16,)
    assert tensor(pruned.model, HEAD_WEIGHT).shape == (16, 10)
    assert len(pruned.model) < 0.5 * len(edge)
    embedding = run_model(pruned.model, {"input": s.x_test[:5]}, output="embedding")
    assert embedding.shape == (5, 16)
    assert pruned.report["achieved_sparsity"] == 0.5
    assert pruned.report["parameters"] < pruned.report["parameters_before"]


def test_a_transformer_feed_forward_block_is_pruned_and_repaired() -> None:
    """The GELU block is one channel group (its biases sliced, its scalar constants left);
    removing half the hidden neurons and refitting the second layer by least squares keeps
    the block's output clearly closer to the unpruned one on held-out rows than without the
    refit (random weights have no redundancy to lose: the refit cannot make it exact)."""
    model = _ffn()
    [group] = find_groups(onnx.load_from_string(model))
    assert (group.producer.weight, group.channels) == ("w1", HIDDEN)
    assert [c.weight for c, _ in group.consumers] == ["w2"]
    assert group.vectors == ["b1"]
    rng = np.random.default_rng(1)
    train = {"x": rng.normal(size=(400, WIDTH)).astype(np.float32)}
    test = {"x": rng.normal(size=(100, WIDTH)).astype(np.float32)}
    reference = run_model(model, test, output="y")
    errors = {}
    for repair in (False, True):
        pruned = structured_prune(model, 0.5, train, repair=repair)
        assert tensor(pruned.model, "w1").shape == (WIDTH, HIDDEN // 2)
        assert tensor(pruned.model, "w2").shape == (HIDDEN // 2, WIDTH)
        out = run_model(pruned.model, test, output="y")
        errors[repair] = np.linalg.norm(out - reference) / np.linalg.norm(reference)
    assert errors[True] < 0.7 * errors[False]


def test_neurons_that_something_else_reads_are_not_pruned(
    reference_onnx: dict[str, bytes],
) -> None:
    """A Reshape (as into attention heads) reads the activations: no group. The SVM's
    distances meet the input's norm in an Add: no group either, so structured pruning of
    it is refused with the reason."""
    assert find_groups(onnx.load_from_string(_ffn(into_reshape=True))) == []
    x = {"input": digits_splits(0).x_train[:50]}
    with pytest.raises(InvalidInput, match="no neurons that can be removed whole"):
        structured_prune(reference_onnx["digits-cloud"], 0.5, x)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_outside_zero_to_one_is_refused(
    reference_onnx: dict[str, bytes], sparsity: float
) -> None:
    x = {"input": digits_splits(0).x_train[:50]}
    with pytest.raises(InvalidInput, match=r"sparsity must be in \[0, 1\)"):
        magnitude_prune(reference_onnx["digits-edge"], sparsity)
    with pytest.raises(InvalidInput, match=r"sparsity must be in \[0, 1\)"):
        structured_prune(reference_onnx["digits-edge"], sparsity, x)

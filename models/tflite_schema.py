"""The TFLite flatbuffer schema, taken from the module that ships inside ai-edge-litert.

TensorFlow is not needed: ai-edge-litert carries `schema_py_generated.py` (the flatc output for
`schema.fbs`, with the object API), and the `flatbuffers` package does the encoding. This shim is the one
place that knows where the schema lives; everything else imports `schema` from here.
"""

from __future__ import annotations

from types import ModuleType

from fedfleet.edge_agent.errors import ModelError

FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3


def _load() -> ModuleType:
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelError(
            "writing .tflite files needs the TFLite schema from ai-edge-litert; "
            "install it with `pip install 'fedfleet[tflite]'`"
        ) from exc
    return schema_py_generated


schema = _load()

__all__ = ["FILE_IDENTIFIER", "SCHEMA_VERSION", "schema"]

"""Tensor payload codecs for task and result payloads: `none`, `zstd`, `fedzip` and `ferret`.

A codec spec is a dict, `{"name": "none"}`, `{"name": "zstd", "level": 3}` or
`{"name": "fedzip", "z": 0.01, "k": 3, "encoding": "e4", ...}` or `{"name": "ferret"}` (Ferret's
(index, gamma) pairs, `fedfleet.edge_agent.wire.ferret_codec`). The receiver decodes against the layout
it expects, so shapes are checked by construction, and every decoder is capped by `max_bytes` before it
allocates or decompresses.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import zstandard

from fedfleet.edge_agent.errors import CodecError

Layout = list[tuple[str, tuple[int, ...]]]
Tensors = dict[str, np.ndarray]
NAMES = ("none", "zstd", "fedzip", "ferret")


def layout_size(layout: Layout) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) for _, shape in layout)


def normalize_layout(raw: Any) -> Layout:
    """A layout from JSON ([[name, [dims]], ...]); raises CodecError when it is not one."""
    if not isinstance(raw, list):
        raise CodecError("layout must be a list of [name, shape] pairs", reason="shape")
    out: Layout = []
    for item in raw:
        if (
            not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str)
            or not isinstance(item[1], (list, tuple))
            or not all(isinstance(d, int) and 0 <= d < 1 << 31 for d in item[1])
        ):
            raise CodecError(f"bad layout entry {str(item)[:80]}", reason="shape")
        out.append((item[0], tuple(item[1])))
    return out


def pack(tensors: Tensors, layout: Layout) -> bytes:
    """Raw little-endian float32 concatenation in layout order."""
    parts = []
    for name, shape in layout:
        arr = np.asarray(tensors[name], dtype="<f4")
        if arr.shape != shape:
            raise CodecError(f"tensor {name} has shape {arr.shape}, layout says {shape}", reason="shape")
        parts.append(np.ascontiguousarray(arr).tobytes())
    return b"".join(parts)


def unpack(data: bytes, layout: Layout) -> Tensors:
    want = layout_size(layout) * 4
    if len(data) != want:
        raise CodecError(f"payload has {len(data)} bytes, layout needs {want}", reason="shape")
    flat = np.frombuffer(data, dtype="<f4")
    out: Tensors = {}
    offset = 0
    for name, shape in layout:
        n = int(np.prod(shape, dtype=np.int64))
        out[name] = flat[offset : offset + n].reshape(shape).astype(np.float32)
        offset += n
    return out


def zstd_decompress(data: bytes, max_bytes: int) -> bytes:
    """Decompress one zstd frame, refusing frames that declare (or turn out) larger than `max_bytes`."""
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"not a zstd frame: {exc}") from None
    if params.content_size > max_bytes:
        raise CodecError(f"zstd frame declares {params.content_size} bytes, cap is {max_bytes}", reason="oversized")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=max_bytes)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt zstd frame: {exc}") from None
    if len(out) > max_bytes:
        raise CodecError(f"zstd output exceeds {max_bytes} bytes", reason="oversized")
    return out


def fedzip_params(spec: dict[str, Any]) -> Any:
    """The FedZipParams of a codec spec. Unknown fields or out-of-range values are a CodecError("codec").
    Memoised on the spec's items (every result of a round names the same spec)."""
    fields = tuple(sorted(((k, v) for k, v in spec.items() if k not in ("name", "error_feedback")), key=lambda kv: str(kv[0])))
    try:
        return _fedzip_params(tuple((k, type(v), v) for k, v in fields))
    except TypeError:  # an unhashable value: no memo (and from_dict says what is wrong)
        return _fedzip_params.__wrapped__(tuple((k, type(v), v) for k, v in fields))


@lru_cache(maxsize=32)
def _fedzip_params(fields: tuple[tuple[str, type, Any], ...]) -> Any:
    from fedfleet.edge_agent import fedzip
    from fedfleet.edge_agent.errors import ConfigError

    try:
        return fedzip.FedZipParams.from_dict({k: v for k, _, v in fields})
    except (ConfigError, TypeError, ValueError) as exc:
        raise CodecError(f"bad fedzip parameters: {str(exc)[:200]}", reason="codec") from None


ZSTD_LEVELS = (1, 22)  # zstd's compression levels
_FIELDS = {"none": {"name"}, "ferret": {"name"}, "zstd": {"name", "level"}}


def check_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate a codec spec: its name, no field the codec does not have, and every parameter in its range
    (zstd `level` an integer in 1..22; FedZip's through `FedZipParams`, `error_feedback` a boolean); returns
    it. Raises CodecError naming what is wrong."""
    if not isinstance(spec, dict) or spec.get("name") not in NAMES:
        raise CodecError(f"unknown codec {spec!r}; choose one of {', '.join(NAMES)}", reason="codec")
    name = spec["name"]
    if name in _FIELDS and set(spec) - _FIELDS[name]:
        unknown = sorted(map(str, set(spec) - _FIELDS[name]))
        raise CodecError(f"unknown field {unknown[0]!r} for codec {name!r}; its fields: "
                         f"{', '.join(sorted(_FIELDS[name] - {'name'})) or 'none'}", reason="codec")
    if name == "zstd" and "level" in spec:
        level, (lo, hi) = spec["level"], ZSTD_LEVELS
        if type(level) is not int or not lo <= level <= hi:
            raise CodecError(f"field 'level' of codec 'zstd' must be an integer from {lo} to {hi}, got {level!r}",
                             reason="codec")
    if name == "fedzip":
        if not isinstance(spec.get("error_feedback", False), bool):
            raise CodecError(f"field 'error_feedback' of codec 'fedzip' must be true or false, got "
                             f"{spec['error_feedback']!r}", reason="codec")
        fedzip_params(spec)
    return spec


def encode(tensors: Tensors, layout: Layout, spec: dict[str, Any]) -> bytes:
    name = spec.get("name", "none")
    if name == "none":
        return pack(tensors, layout)
    if name == "zstd":
        return zstandard.ZstdCompressor(level=int(spec.get("level", 3))).compress(pack(tensors, layout))
    if name == "fedzip":
        from fedfleet.edge_agent import fedzip

        params = fedzip.FedZipParams.from_dict({k: v for k, v in spec.items() if k not in ("name", "error_feedback")})
        return fedzip.encode({n: np.asarray(tensors[n], np.float32) for n, _ in layout}, params)
    if name == "ferret":
        from fedfleet.edge_agent.wire import ferret_codec

        return ferret_codec.encode(tensors, layout)
    raise CodecError(f"unknown codec {name!r}", reason="codec")


def decode(data: bytes, layout: Layout, spec: dict[str, Any], *, max_bytes: int) -> Tensors:
    """Decode a payload into the tensors of `layout`. Every failure is a CodecError."""
    name = spec.get("name", "none") if isinstance(spec, dict) else None
    want = layout_size(layout) * 4
    if want > max_bytes:
        raise CodecError(f"layout needs {want} bytes, cap is {max_bytes}", reason="oversized")
    if name == "none":
        return unpack(data, layout)
    if name == "zstd":
        if set(spec) - {"name", "level"}:
            raise CodecError(f"unknown zstd codec fields {sorted(set(spec) - {'name', 'level'})}", reason="codec")
        return unpack(zstd_decompress(data, want), layout)
    if name == "fedzip":
        from fedfleet.edge_agent import fedzip

        params = fedzip_params(spec)
        try:
            return fedzip.decode(data, layout, params, max_bytes=max_bytes)
        except CodecError:
            raise
        except Exception as exc:  # a decoder bug must not crash the receiver
            raise CodecError(f"fedzip payload could not be decoded: {type(exc).__name__}: {exc}") from None
    if name == "ferret":
        from fedfleet.edge_agent.wire import ferret_codec

        return ferret_codec.decode(data, layout)
    raise CodecError(f"unknown codec {name!r}", reason="codec")


def all_finite(tensors: Tensors) -> bool:
    return all(bool(np.isfinite(t).all()) for t in tensors.values())

"""Reading an .npz with its sizes checked before anything is allocated.

`np.load` trusts an archive: a member whose .npy header declares 2^40 floats is allocated as declared, and
a small deflate bomb is inflated whole. `read_npz(source, max_bytes=...)` reads each member's .npy header
from the (streamed) member first, checks the dtype (plain numbers only), the shape, and the bytes it
declares against what is left of `max_bytes` (and `expect(name, shape, dtype)`, if given, which raises
ValueError for a tensor it does not want), and only then reads exactly that many bytes from the stream:
never more is inflated than the arrays the caller accepted. Every failure is a ValueError with one line
naming the member.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

MAX_HEADER = 10_000  # bytes of one .npy header (numpy's own default limit)


def _header(fh: io.BufferedIOBase, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            return fmt.read_array_header_1_0(fh, max_header_size=MAX_HEADER)
        if version in ((2, 0), (3, 0)):
            return fmt.read_array_header_2_0(fh, max_header_size=MAX_HEADER)
    except Exception as exc:  # noqa: BLE001 - numpy's header parser raises ValueError, SyntaxError, TokenError ...
        raise ValueError(f"member {name!r} has a malformed .npy header ({str(exc)[:120]})") from None
    raise ValueError(f"member {name!r} has .npy format version {version}, not 1, 2 or 3")


def read_npz(source: str | Path | bytes, *, max_bytes: int,
             expect: Callable[[str, tuple[int, ...], np.dtype], None] | None = None) -> dict[str, np.ndarray]:
    """The arrays of the .npz `source` (a path or its bytes), at most `max_bytes` of array data in all."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise ValueError(f"not an .npz archive ({str(exc)[:120]})") from None
    out: dict[str, np.ndarray] = {}
    left = int(max_bytes)
    with zf:
        for info in zf.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if not info.filename.endswith(".npy") or name in out:
                raise ValueError(f"member {info.filename[:80]!r} is not one .npy array")
            try:
                fh = zf.open(info)
            except (OSError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as exc:
                raise ValueError(f"member {name!r} cannot be read ({str(exc)[:120]})") from None
            with fh:
                shape, fortran, dtype = _header(fh, name)
                if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None:
                    raise ValueError(f"member {name!r} holds {dtype}, not plain numbers")
                if len(shape) > 8 or any(d < 0 for d in shape):
                    raise ValueError(f"member {name!r} declares the shape {shape}")
                nbytes = math.prod(shape) * dtype.itemsize
                if nbytes > left:
                    raise ValueError(f"member {name!r} declares {shape} of {dtype} ({nbytes} bytes), more than "
                                     f"the {max_bytes} bytes allowed")
                if expect is not None:
                    expect(name, tuple(shape), dtype)
                try:
                    data = fh.read(nbytes)
                    trailing = fh.read(1)
                except (OSError, zipfile.BadZipFile, EOFError) as exc:
                    raise ValueError(f"member {name!r} cannot be read ({str(exc)[:120]})") from None
            if len(data) != nbytes or trailing:
                raise ValueError(f"member {name!r} holds {len(data)}{'+' if trailing else ''} bytes of data, its "
                                 f"header declares {nbytes}")
            left -= nbytes
            out[name] = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C").copy()
    return out

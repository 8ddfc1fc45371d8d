"""Deterministic zip members for model packages: tensors as a stored `.npz`, and the package zip itself."""

from __future__ import annotations

import io
import zipfile

import numpy as np

_EPOCH = (1980, 1, 1, 0, 0, 0)


def npz(tensors: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(tensors):
            member = io.BytesIO()
            np.save(member, np.ascontiguousarray(tensors[name], dtype=np.float32), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", _EPOCH), member.getvalue())
    return buf.getvalue()


def write_zip(members: dict[str, bytes]) -> bytes:
    """Deterministic zip of `members` (name -> bytes): sorted, fixed timestamps, deflated."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, _EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, members[name])
    return buf.getvalue()

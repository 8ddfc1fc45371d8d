"""Byte-level reading and writing for FedZip payloads: unsigned LEB128 varints, bytes, little-endian floats.

`Reader` checks every length against what is left before it slices, so a truncated payload raises
CodecError instead of reading past the end.
"""

from __future__ import annotations

import numpy as np

from ..errors import CodecError


class Writer:
    def __init__(self) -> None:
        self.buf = bytearray()

    def u8(self, x: int) -> None:
        self.buf.append(x)

    def varint(self, x: int) -> None:
        if x < 0:
            raise ValueError("varint: negative value")
        while True:
            byte = x & 0x7F
            x >>= 7
            if x:
                self.buf.append(byte | 0x80)
            else:
                self.buf.append(byte)
                return

    def raw(self, b: bytes) -> None:
        self.buf += b

    def f32(self, a: np.ndarray) -> None:
        self.buf += np.asarray(a, dtype="<f4").tobytes()

    def getvalue(self) -> bytes:
        return bytes(self.buf)


class Reader:
    def __init__(self, data: bytes | memoryview) -> None:
        self.data = memoryview(data)
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        if self.left < 1:
            raise CodecError("payload truncated (expected one more byte); resend the update")
        x = self.data[self.pos]
        self.pos += 1
        return int(x)

    def varint(self, limit: int) -> int:
        """A varint that must be <= limit (checked as it is read, so a huge value is refused early)."""
        x, shift = 0, 0
        while True:
            byte = self.u8()
            x |= (byte & 0x7F) << shift
            if x > limit:
                raise CodecError(f"payload declares {x}, more than the allowed {limit}; the payload is corrupt")
            if not byte & 0x80:
                return x
            shift += 7
            if shift > 63:
                raise CodecError("varint longer than 64 bits; the payload is corrupt")

    def raw(self, n: int) -> memoryview:
        if n < 0 or n > self.left:
            raise CodecError(f"payload truncated: need {n} bytes, {self.left} left; resend the update")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def bits(self, nbits: int) -> np.ndarray:
        """The bytes of a bit stream of nbits bits."""
        return np.frombuffer(self.raw((nbits + 7) // 8), dtype=np.uint8)

    def f32(self, n: int) -> np.ndarray:
        return np.frombuffer(self.raw(4 * n), dtype="<f4").astype(np.float32)

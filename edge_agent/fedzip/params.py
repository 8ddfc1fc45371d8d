"""FedZipParams: the codec's parameters as a task names them, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ConfigError

ENCODINGS = ("e1", "e2", "e3", "e4")
MAX_K = 16  # cluster ids use one byte and the E1 alphabet (k + 1 symbols) keeps codewords short


@dataclass(frozen=True)
class FedZipParams:
    z: float = 0.01  # fraction kept per tensor by top-z
    k: int = 3  # clusters over the kept entries
    encoding: str = "e4"  # "e1" | "e2" | "e3" | "e4"
    zstd_level: int = 3  # final zstd stage; 0 disables it

    def __post_init__(self) -> None:
        if isinstance(self.z, bool) or not isinstance(self.z, (int, float)) or not math.isfinite(self.z):
            raise ConfigError(f"fedzip.z must be a number in (0, 1], got {self.z!r}")
        if not 0.0 < float(self.z) <= 1.0:
            raise ConfigError(f"fedzip.z must be in (0, 1] (the fraction of entries kept), got {self.z!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= MAX_K:
            raise ConfigError(f"fedzip.k must be an integer in 1..{MAX_K}, got {self.k!r}")
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"fedzip.encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        lvl = self.zstd_level
        if isinstance(lvl, bool) or not isinstance(lvl, int) or not 0 <= lvl <= 22:
            raise ConfigError(f"fedzip.zstd_level must be an integer in 0..22 (0 disables zstd), got {lvl!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FedZipParams:
        """Parameters from a task or config mapping; missing fields take their defaults."""
        if not isinstance(d, dict):
            raise ConfigError(f"fedzip parameters must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"fedzip: unknown field(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def keep_count(self, n: int) -> int:
        """Entries kept by top-z in a tensor of n: ceil(z n), at least 1 (z n rounded to 6 decimals first,
        so that a decimal z such as 0.07 behaves as written despite binary floating point)."""
        if n <= 0:
            return 0
        return min(n, max(1, math.ceil(round(float(self.z) * n, 6))))

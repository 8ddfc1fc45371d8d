"""Device profiles as the edge agent loads them: `fedfleet.firmware_profiles.schema` with its errors as ConfigError."""

from __future__ import annotations

from pathlib import Path

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.firmware_profiles.schema import Profile, ProfileError
from fedfleet.firmware_profiles.schema import load_profile as _load_profile

__all__ = ["Profile", "load_profile"]


def load_profile(profile: str | Path) -> Profile:
    """A shipped profile by name, or a profile TOML file by path; ConfigError naming the file and field."""
    try:
        return _load_profile(profile)
    except ProfileError as exc:
        raise ConfigError(str(exc)) from None

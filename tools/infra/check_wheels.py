"""Check that the device extras install from binary wheels on linux aarch64 (Raspberry Pi OS, JetPack).

For every requirement of the `edge` and `tflite` extras (read from pyproject.toml) and every Python
version (3.10 for JetPack 6, 3.11 for Raspberry Pi OS Bookworm), this runs

    pip download --only-binary=:all: --platform manylinux2014_aarch64 [--platform manylinux_2_X_aarch64 ...]
                 --python-version 3.10 --implementation cp -d TMP REQUIREMENT

into a temporary directory, dependencies included, so a requirement passes only if it and everything it
pulls in resolve to wheels. Environment markers are judged for the target (aarch64 Linux, that Python),
not for this machine: a requirement whose marker is false there is reported as skipped. The manylinux tags offered go up to glibc 2.35 (`--max-glibc`): JetPack 6
(Ubuntu 22.04) has 2.35 and Raspberry Pi OS Bookworm 2.36. It prints one JSON object: per requirement and
Python, the wheel file chosen (and its dependencies' wheels) or pip's error; exit status 1 if any failed.
Not part of CI: it needs PyPI and downloads a few hundred MB.

    python -m fedfleet.tools.infra.check_wheels [--python 3.10 3.11] [--extras edge tflite] [--max-glibc 35] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_EXTRAS = {
    "edge": ["numpy>=1.24", "onnxruntime>=1.17", "paho-mqtt>=2.0", "zstandard>=0.22", "cryptography>=42"],
    "tflite": ["ai-edge-litert>=1.2", "flatbuffers>=24.3"],
}


def extras_from_pyproject(path: Path, names: list[str]) -> dict[str, list[str]]:
    """The requirements of extras `names` in pyproject.toml (the defaults above if it cannot be read)."""
    try:
        import tomllib

        declared = tomllib.loads(path.read_text())["project"]["optional-dependencies"]
    except (ImportError, OSError, KeyError):
        declared = DEFAULT_EXTRAS
    missing = [n for n in names if n not in declared]
    if missing:
        raise SystemExit(f"extras {missing} are not declared in {path}; choose from {sorted(declared)}")
    return {n: list(declared[n]) for n in names}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def platforms(max_glibc: int) -> list[str]:
    return ["manylinux2014_aarch64"] + [f"manylinux_2_{minor}_aarch64" for minor in range(17, max_glibc + 1)]


def _requirement(text: str) -> Any:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement
    return Requirement(text)


def target_environment(python: str) -> dict[str, str]:
    """Marker environment of CPython `python` on linux aarch64 (the device, not this machine)."""
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "platform_machine": "aarch64",
        "platform_system": "Linux",
        "sys_platform": "linux",
        "os_name": "posix",
    }


def check(requirement: str, python: str, plats: list[str]) -> dict[str, Any]:
    req = _requirement(requirement)
    row: dict[str, Any] = {"requirement": requirement, "python": python}
    if req.marker is not None and not req.marker.evaluate(target_environment(python)):
        row.update(ok=True, wheel=None, skipped=f"marker {req.marker} is false on Python {python}")
        return row
    name = req.name
    # pip would judge the marker against this interpreter: pass the requirement without it
    spec = f"{req.name}{'[' + ','.join(sorted(req.extras)) + ']' if req.extras else ''}{req.specifier}"
    with tempfile.TemporaryDirectory(prefix="wheels-") as dest:
        cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--implementation", "cp"]
        cmd += ["--python-version", python, "--progress-bar", "off", "--disable-pip-version-check", "-q"]
        for plat in plats:
            cmd += ["--platform", plat]
        cmd += ["-d", dest, spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = sorted(p.name for p in Path(dest).iterdir())
    own = [f for f in files if _canonical(f.split("-")[0]) == _canonical(name)]
    if proc.returncode != 0 or not own:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        row.update(ok=False, wheel=None, error=" | ".join(err[-3:]) or "no wheel downloaded")
    else:
        row.update(ok=True, wheel=own[0], deps=[f for f in files if f not in own])
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedfleet.tools.infra.check_wheels", description=__doc__.splitlines()[0])
    ap.add_argument("--python", nargs="+", default=["3.10", "3.11"])
    ap.add_argument("--extras", nargs="+", default=["edge", "tflite"])
    ap.add_argument("--max-glibc", type=int, default=35, help="highest manylinux_2_X tag to accept")
    ap.add_argument("--pyproject", default=str(Path(__file__).resolve().parents[2] / "pyproject.toml"))
    ap.add_argument("--json", metavar="PATH", help="also write the JSON here")
    args = ap.parse_args(argv)
    plats = platforms(args.max_glibc)
    results = []
    for extra, reqs in extras_from_pyproject(Path(args.pyproject), args.extras).items():
        for req in reqs:
            for py in args.python:
                row = check(req, py, plats)
                results.append({"extra": extra, **row})
                print(
                    f"{'ok  ' if row['ok'] else 'FAIL'} {extra:7s} {req:22s} py{py}: {row['wheel'] or row.get('skipped') or row['error']}",
                    file=sys.stderr,
                )
    out = {
        "platform": "linux aarch64",
        "max_glibc": f"2.{args.max_glibc}",
        "ok": all(r["ok"] for r in results),
        "results": results,
    }
    text = json.dumps(out, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

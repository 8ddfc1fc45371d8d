"""Self-signed TLS material for a broker on this host: a CA and a server certificate for 127.0.0.1 and
localhost, made with the `openssl` command. For tests and trials; production fleets use their own CA."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedfleet.edge_agent.errors import ConfigError


@dataclass(frozen=True)
class TLSFiles:
    cafile: Path
    certfile: Path
    keyfile: Path


def make_local_ca(directory: str | Path, *, days: int = 2) -> TLSFiles:
    """Write ca.crt, server.crt and server.key into `directory` (a fresh EC P-256 CA signs the server cert)."""
    if shutil.which("openssl") is None:
        raise ConfigError("the openssl command is needed to make TLS certificates: apt-get install -y openssl")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, crt = (d / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ext = d / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(ca_key))
    run("req", "-x509", "-new", "-key", str(ca_key), "-subj", "/CN=fedfleet test CA", "-days", str(days),
        "-out", str(ca))
    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    run("req", "-new", "-key", str(key), "-subj", "/CN=127.0.0.1", "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", str(days), "-extfile", str(ext), "-out", str(crt))
    for p in (key, ca_key):
        p.chmod(0o600)
    return TLSFiles(ca, crt, key)

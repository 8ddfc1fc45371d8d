"""`fedfleet tls`: a CA and server certificates for the broker, made with `cryptography` (no `openssl` command).

    fedfleet tls ca --out ca                                   ca/ca.crt, ca/ca.key (0600)
    fedfleet tls cert --ca ca --host coordinator.lan --out ca  ca/server.crt, ca/server.key (0600)

`make_ca` makes a self-signed EC P-256 CA; `make_server_cert` a server certificate signed by it whose subject
alternative names are the given host names and IP addresses (a broker reached as `mqtts://coordinator.lan`
needs `coordinator.lan` among them). `make_local_ca` does both for 127.0.0.1 and localhost (tests, trials).
Private keys are written 0600 with `fedfleet.coordinator.safe_files`, never through a symlink.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from fedfleet.coordinator.safe_files import check_text, make_dir, write_file
from fedfleet.edge_agent.errors import ConfigError


@dataclass(frozen=True)
class TLSFiles:
    cafile: Path
    certfile: Path
    keyfile: Path


def _crypto():  # noqa: ANN202 - the cryptography modules, with a clear error when it is missing
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise ConfigError("TLS certificates need the cryptography package: pip install cryptography") from None
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _key_pem(key) -> bytes:  # noqa: ANN001
    _, _, serialization, *_ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _check_days(days: int) -> int:
    if not isinstance(days, int) or not 1 <= days <= 36500:
        raise ConfigError(f"--days must be a whole number of days in 1..36500, got {days!r}")
    return days


def make_ca(directory: str | Path, *, name: str = "fedfleet CA", days: int = 3650) -> tuple[Path, Path]:
    """Write `ca.crt` and `ca.key` (0600) into `directory`; returns their paths. Never overwrites a CA."""
    x509, hashes, serialization, ec, _, NameOID = _crypto()
    check_text(name, "--name")
    d = make_dir(directory, "--out")
    crt, key_path = d / "ca.crt", d / "ca.key"
    for p in (crt, key_path):
        if p.exists() or p.is_symlink():
            raise ConfigError(f"{p} exists: a CA is never overwritten (choose another --out)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=_check_days(days)))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    write_file(key_path, _key_pem(key), secret=True)
    write_file(crt, cert.public_bytes(serialization.Encoding.PEM))
    return crt, key_path


def _load_ca(ca_dir: str | Path):  # noqa: ANN202
    x509, _, serialization, *_ = _crypto()
    d = Path(ca_dir)
    try:
        cert = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"--ca {ca_dir}: {exc.strerror} ({exc.filename}); make a CA with `fedfleet tls ca`") from None
    except ValueError as exc:
        raise ConfigError(f"--ca {ca_dir}: not a PEM CA certificate and key ({exc})") from None
    return cert, key


def _san(hosts: list[str]):  # noqa: ANN202
    x509, *_ = _crypto()
    names = []
    for h in hosts:
        check_text(h, "--host")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not h or any(c.isspace() for c in h):
                raise ConfigError(f"--host {h!r}: give a host name or an IP address") from None
            names.append(x509.DNSName(h))
    if not names:
        raise ConfigError("--host: give at least one host name or IP address")
    return x509.SubjectAlternativeName(names)


def make_server_cert(ca_dir: str | Path, hosts: list[str], out: str | Path, *, name: str = "server",
                     days: int = 825) -> TLSFiles:
    """`OUT/<name>.crt` and `OUT/<name>.key` (0600) for `hosts`, signed by the CA in `ca_dir`; also copies
    the CA certificate to `OUT/ca.crt` when OUT is not the CA's own directory. Replaces an older pair."""
    x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID = _crypto()
    ca_cert, ca_key = _load_ca(ca_dir)
    check_text(name, "--name")
    d = make_dir(out, "--out")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=_check_days(days)))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    write_file(d / f"{name}.key", _key_pem(key), secret=True, replace=True)
    write_file(d / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM), replace=True)
    cafile = Path(ca_dir) / "ca.crt"
    if d.resolve() != Path(ca_dir).resolve():
        write_file(d / "ca.crt", cafile.read_bytes(), replace=True)
        cafile = d / "ca.crt"
    return TLSFiles(cafile, d / f"{name}.crt", d / f"{name}.key")


def make_local_ca(directory: str | Path, *, days: int = 2) -> TLSFiles:
    """A fresh CA and a server certificate for 127.0.0.1 and localhost, all in `directory` (tests, trials)."""
    make_ca(directory, name="fedfleet test CA", days=days)
    return make_server_cert(directory, ["127.0.0.1", "localhost"], directory, days=days)


def main(argv: list[str]) -> int:
    from fedfleet.edge_agent.cli_run import ArgParser

    p = ArgParser(prog="fedfleet tls", description="a CA and server certificates for the broker")
    sub = p.add_subparsers(dest="what", required=True, metavar="{ca,cert}", help="ca: make a CA; cert: a server "
                           "certificate signed by it")
    ca = sub.add_parser("ca", help="make a CA: OUT/ca.crt and OUT/ca.key (0600)")
    ca.add_argument("--out", required=True, help="directory for ca.crt and ca.key")
    ca.add_argument("--name", default="fedfleet CA", help="the CA's common name")
    ca.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    cert = sub.add_parser("cert", help="a server certificate signed by the CA: OUT/NAME.crt, OUT/NAME.key (0600)")
    cert.add_argument("--ca", required=True, help="the CA's directory (from `fedfleet tls ca`)")
    cert.add_argument("--host", required=True, action="append",
                      help="a host name or IP address clients use to reach the broker (repeat for more)")
    cert.add_argument("--out", required=True, help="directory for the certificate and key")
    cert.add_argument("--name", default="server", help="file name stem (default server)")
    cert.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    args = p.parse_args(argv)
    if args.what == "ca":
        crt, key = make_ca(args.out, name=args.name, days=args.days)
        print(f"{crt}\n{key}")
    else:
        files = make_server_cert(args.ca, args.host, args.out, name=args.name, days=args.days)
        print(f"{files.certfile}\n{files.keyfile}")
    return 0

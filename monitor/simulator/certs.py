"""TLS material for the simulator: a local trustme CA, the server certificate, client certificates."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.x509.oid import NameOID

SERVER_NAMES = ("127.0.0.1", "localhost", "::1")


def b64url(data: bytes) -> str:
    """base64url without padding (JWT style)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of b64url; ValueError on bad input."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("invalid base64url") from exc


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only (0600), replacing any previous one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


class ServerTLS:
    """A fresh local CA and a server certificate for 127.0.0.1/localhost; CA PEM in state_dir."""

    def __init__(self, state_dir: Path) -> None:
        self._ca = trustme.CA(organization_name="mde-monitor simulator")
        self._cert = self._ca.issue_cert(*SERVER_NAMES)
        self.ca_path = state_dir / "ca.pem"
        state_dir.mkdir(parents=True, exist_ok=True)
        self._ca.cert_pem.write_to_path(str(self.ca_path))

    def server_context(self) -> ssl.SSLContext:
        """Server-side context presenting the 127.0.0.1 certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._cert.configure_cert(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Client-side context trusting the simulator CA."""
        return ssl.create_default_context(cafile=str(self.ca_path))


@dataclass(frozen=True)
class ClientCertificate:
    """An app registration's certificate credential (public part only is kept by the 'cloud')."""

    pem_path: Path
    thumbprint: str  # SHA-1, upper-case hex, as the Azure portal shows it
    sha256_thumbprint: str  # lower-case hex
    public_key: RSAPublicKey = field(repr=False)

    @property
    def x5t(self) -> str:
        """The `x5t` JWT header MSAL sends: base64url of the binary SHA-1 thumbprint."""
        return b64url(bytes.fromhex(self.thumbprint))

    @property
    def x5t_s256(self) -> str:
        """The `x5t#S256` JWT header: base64url of the binary SHA-256 thumbprint."""
        return b64url(bytes.fromhex(self.sha256_thumbprint))


def make_client_certificate(path: Path, common_name: str) -> ClientCertificate:
    """Generate an RSA key + self-signed certificate; write both as one PEM file (0600)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    write_private(path, key_pem + cert_pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    return ClientCertificate(
        pem_path=path,
        thumbprint=hashlib.sha1(der).hexdigest().upper(),
        sha256_thumbprint=hashlib.sha256(der).hexdigest(),
        public_key=key.public_key(),
    )

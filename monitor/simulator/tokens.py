"""Access tokens (HS256 JWTs signed with a per-simulator key) and client-assertion checks."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from monitor.simulator.certs import ClientCertificate, b64url, b64url_decode


class TokenProblem(StrEnum):
    """Why an access token was refused."""

    MISSING = "missing"
    MALFORMED = "malformed"
    SIGNATURE = "signature"
    EXPIRED = "expired"
    AUDIENCE = "audience"


class TokenError(Exception):
    """An access token was refused; `problem` says why."""

    def __init__(self, problem: TokenProblem) -> None:
        super().__init__(problem.value)
        self.problem = problem


def _split(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("a JWT has three parts")
    header = orjson.loads(b64url_decode(parts[0]))
    claims = orjson.loads(b64url_decode(parts[1]))
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise ValueError("JWT header and claims must be objects")
    return header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), b64url_decode(parts[2])


class TokenIssuer:
    """Mints and validates the simulator's access tokens."""

    def __init__(self, lifetime: int = 3599) -> None:
        self.lifetime = lifetime
        self._key = os.urandom(32)
        self._generation = 0
        self._lock = threading.Lock()

    def expire_all(self) -> None:
        """Invalidate every token issued so far (they validate as expired)."""
        with self._lock:
            self._generation += 1

    def issue(
        self, *, tenant_id: str, client_id: str, audience: str, issuer: str, roles: list[str]
    ) -> tuple[str, int]:
        """A signed access token and its lifetime in seconds."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": audience,
            "iss": issuer,
            "iat": now,
            "nbf": now,
            "exp": now + self.lifetime,
            "appid": client_id,
            "azp": client_id,
            "idtyp": "app",
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sp:{tenant_id}:{client_id}")),
            "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sp:{tenant_id}:{client_id}")),
            "tid": tenant_id,
            "ver": "1.0",
            "uti": uuid.uuid4().hex[:22],
            "simgen": self._generation,
        }
        if roles:
            claims["roles"] = roles
        header = b64url(orjson.dumps({"typ": "JWT", "alg": "HS256", "kid": "sim"}))
        payload = b64url(orjson.dumps(claims))
        signing_input = f"{header}.{payload}".encode("ascii")
        signature = b64url(hmac.new(self._key, signing_input, hashlib.sha256).digest())
        return f"{header}.{payload}.{signature}", self.lifetime

    def sign(self, claims: dict[str, Any]) -> str:
        """A token with these claims, signed like the access tokens (ID tokens of sign-ins)."""
        header = b64url(orjson.dumps({"typ": "JWT", "alg": "HS256", "kid": "sim"}))
        payload = b64url(orjson.dumps(claims))
        signing_input = f"{header}.{payload}".encode("ascii")
        return f"{header}.{payload}.{b64url(hmac.new(self._key, signing_input, hashlib.sha256).digest())}"

    def claims_if_signed(self, token: str) -> dict[str, Any] | None:
        """The claims of a token this simulator signed (expired or not), else None."""
        try:
            header, claims, signing_input, signature = _split(token)
        except ValueError:
            return None
        if header.get("alg") != "HS256":
            return None
        expected = hmac.new(self._key, signing_input, hashlib.sha256).digest()
        return claims if hmac.compare_digest(expected, signature) else None

    def validate(self, authorization: str | None, audience: str) -> dict[str, Any]:
        """Claims of a valid bearer token for `audience`; TokenError otherwise."""
        if not authorization:
            raise TokenError(TokenProblem.MISSING)
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenError(TokenProblem.MISSING)
        token = token.strip()
        if token.count(".") != 2:
            raise TokenError(TokenProblem.MALFORMED)
        claims = self.claims_if_signed(token)
        if claims is None:
            raise TokenError(TokenProblem.SIGNATURE)
        now = time.time()
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if (
            not isinstance(exp, int)
            or not isinstance(nbf, int)
            or now >= exp
            or now < nbf - 300
            or claims.get("simgen") != self._generation
        ):
            raise TokenError(TokenProblem.EXPIRED)
        if claims.get("aud") != audience:
            raise TokenError(TokenProblem.AUDIENCE)
        return claims


class AssertionProblem(StrEnum):
    """Why a client assertion was refused (maps onto AADSTS codes)."""

    MALFORMED = "malformed"  # AADSTS50027
    UNKNOWN_CERTIFICATE = "unknown_certificate"  # AADSTS700027 (key not registered)
    SIGNATURE = "signature"  # AADSTS7000274 style signature failure
    EXPIRED = "expired"  # AADSTS700024
    AUDIENCE = "audience"  # AADSTS700016-ish: wrong audience
    ISSUER = "issuer"  # iss/sub must be the client id


@dataclass(frozen=True)
class AssertionResult:
    ok: bool
    problem: AssertionProblem | None = None


def verify_client_assertion(
    assertion: str, cert: ClientCertificate | None, client_id: str, token_path: str
) -> AssertionResult:
    """Check an RS256/PS256 client assertion as Entra ID does (x5t or x5t#S256 header)."""
    try:
        header, claims, signing_input, signature = _split(assertion)
    except ValueError:
        return AssertionResult(False, AssertionProblem.MALFORMED)
    alg = header.get("alg")
    if alg not in ("RS256", "PS256"):
        return AssertionResult(False, AssertionProblem.MALFORMED)
    # MSAL pads the thumbprint headers with "="; Entra ID accepts either form.
    x5t = str(header.get("x5t") or "").rstrip("=")
    x5t_s256 = str(header.get("x5t#S256") or "").rstrip("=")
    if cert is None or (x5t != cert.x5t and x5t_s256 != cert.x5t_s256):
        return AssertionResult(False, AssertionProblem.UNKNOWN_CERTIFICATE)
    pad: padding.AsymmetricPadding = (
        padding.PKCS1v15()
        if alg == "RS256"
        else padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
    )
    try:
        cert.public_key.verify(signature, signing_input, pad, hashes.SHA256())
    except InvalidSignature:
        return AssertionResult(False, AssertionProblem.SIGNATURE)
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        return AssertionResult(False, AssertionProblem.ISSUER)
    aud = claims.get("aud")
    if not isinstance(aud, str) or not aud.endswith(token_path):
        return AssertionResult(False, AssertionProblem.AUDIENCE)
    exp, now = claims.get("exp"), time.time()
    nbf = claims.get("nbf", 0)
    if (
        not isinstance(exp, int | float)
        or now >= exp + 300
        or (isinstance(nbf, int | float) and now < nbf - 300)
    ):
        return AssertionResult(False, AssertionProblem.EXPIRED)
    return AssertionResult(True)

"""Who is asking and may they: bearer tokens, Redis-backed sessions, CSRF, audit, headers.

- A browser always carries a random session id cookie (`mde_sid`, HttpOnly, SameSite=Lax, Secure
  unless it is plain HTTP to a loopback address). The CSRF token of a page is an HMAC of that id
  with the console's secret: stateless, tied to the session, and rotated with it at sign-in.
- Signed-in state (user, role, how) lives in Redis under `<prefix>:web:session:<sha256(sid)>`
  with a TTL; the id itself is never stored.
- `Authorization: Bearer <token>` (headless use) is checked against the configured tokens in
  constant time; such requests carry no ambient credential, so they need no CSRF token.
- Every operator action is appended to the `<prefix>:web:audit` stream (who, what, when).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from monitor.config import Settings

COOKIE = "mde_sid"
AUDIT_MAXLEN = 10_000
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none';"
    " frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class User:
    name: str
    role: str  # viewer | operator
    via: str  # local | token | session:token | session:entra

    @property
    def operator(self) -> bool:
        return self.role == "operator"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "role": self.role, "via": self.via}


LOCAL_USER = User("local", "operator", "local")


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class Guard:
    """Authentication, sessions, CSRF and audit for one console."""

    def __init__(self, settings: Settings, client: redis.Redis, *, host: str) -> None:
        self.client = client
        self.prefix = settings.redis_prefix
        web = settings.web
        self.tokens = [(_digest(t.secret()), t.name, t.role) for t in web.tokens]
        self.oidc = web.oidc
        self.session_ttl = int(web.session_hours * 3600)
        # Authentication is required off loopback, and whenever a method is configured.
        self.auth_required = bool(self.tokens or self.oidc) or not is_loopback(host)
        self.secret = self._secret()

    def _secret(self) -> bytes:
        """The HMAC key of CSRF tokens, shared by every console of this prefix (kept in Redis)."""
        key = f"{self.prefix}:web:secret"
        self.client.set(key, secrets.token_hex(32), nx=True)
        raw: Any = self.client.get(key)
        return bytes(raw) if isinstance(raw, bytes) else str(raw).encode()

    # -- tokens and sessions ----------------------------------------------------------------
    def check_token(self, token: str) -> User | None:
        """The user of a static bearer token (constant-time comparison), or None."""
        d = _digest(token)
        found = None
        for digest, name, role in self.tokens:
            if hmac.compare_digest(d, digest):
                found = User(name, role, "token")
        return found

    def _session_key(self, sid: str) -> str:
        return f"{self.prefix}:web:session:{hashlib.sha256(sid.encode()).hexdigest()}"

    def session_user(self, sid: str | None) -> User | None:
        if not sid:
            return None
        raw: Any = self.client.get(self._session_key(sid))
        if not raw:
            return None
        data = orjson.loads(raw)
        return User(str(data["name"]), str(data["role"]), str(data["via"]))

    def start_session(self, user: User) -> str:
        """A fresh session id for a signed-in user (the old id is dropped by the caller)."""
        sid = secrets.token_urlsafe(32)
        doc = {"name": user.name, "role": user.role, "via": f"session:{user.via}"}
        self.client.set(self._session_key(sid), orjson.dumps(doc), ex=self.session_ttl)
        return sid

    def end_session(self, sid: str | None) -> None:
        if sid:
            self.client.delete(self._session_key(sid))

    @staticmethod
    def new_sid() -> str:
        return secrets.token_urlsafe(32)

    # -- CSRF --------------------------------------------------------------------------------
    def csrf_token(self, sid: str) -> str:
        return hmac.new(self.secret, b"csrf:" + sid.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, sid: str | None, token: str | None) -> bool:
        if not sid or not token:
            return False
        return hmac.compare_digest(self.csrf_token(sid), token)

    # -- OIDC state kept server-side between /login/entra and the callback -------------------
    def put_flow(self, sid: str, flow: dict[str, Any]) -> None:
        self.client.set(self._session_key(sid) + ":flow", orjson.dumps(flow), ex=600)

    def pop_flow(self, sid: str) -> dict[str, Any] | None:
        key = self._session_key(sid) + ":flow"
        pipe = self.client.pipeline(transaction=True)
        pipe.get(key)
        pipe.delete(key)
        raw = pipe.execute()[0]
        return orjson.loads(raw) if raw else None

    # -- audit -------------------------------------------------------------------------------
    @property
    def audit_key(self) -> str:
        return f"{self.prefix}:web:audit"

    def audit(
        self, user: User, action: str, target: str, detail: str = "", ok: bool = True
    ) -> None:
        """Record one operator action (who, what, when, outcome)."""
        self.client.xadd(
            self.audit_key,
            {
                "ts": f"{time.time():.3f}",
                "user": user.name,
                "role": user.role,
                "via": user.via,
                "action": action,
                "target": target,
                "detail": detail[:500],
                "ok": "1" if ok else "0",
            },
            maxlen=AUDIT_MAXLEN,
            approximate=True,
        )

    def audit_entries(self, count: int = 100) -> list[dict[str, Any]]:
        raw: Any = self.client.xrevrange(self.audit_key, count=count)
        out = []
        for sid, fields in raw:
            rec: dict[str, Any] = {"id": sid.decode() if isinstance(sid, bytes) else sid}
            for k, v in fields.items():
                rec[k.decode() if isinstance(k, bytes) else k] = (
                    v.decode() if isinstance(v, bytes) else v
                )
            rec["ok"] = rec.get("ok") == "1"
            out.append(rec)
        return out

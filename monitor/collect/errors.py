"""Collection errors: one hierarchy, each naming the endpoint, status and Microsoft error code."""

from __future__ import annotations


class CollectError(Exception):
    """Base class; messages never contain tokens or secrets."""


class AuthError(CollectError):
    """Sign-in to Entra ID failed (wrong secret, unknown tenant, ...)."""

    def __init__(self, message: str, *, code: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code  # e.g. "AADSTS7000215"
        self.hint = hint


class ApiError(CollectError):
    """An API call failed for good (after retries where retrying could help)."""

    def __init__(
        self,
        endpoint: str,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retryable: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.status = status
        self.code = code
        self.retryable = retryable
        where = f"{endpoint}: " if endpoint else ""
        status_part = f"HTTP {status}" if status is not None else "no response"
        code_part = f" {code}" if code else ""
        super().__init__(f"{where}{status_part}{code_part}: {message}")


class PermissionMissing(ApiError):
    """403: the app registration lacks an application permission (or admin consent)."""

    def __init__(
        self, endpoint: str, permission: str, *, status: int = 403, code: str | None = None
    ) -> None:
        super().__init__(
            endpoint,
            f"permission {permission} is missing or not admin-consented for this app registration",
            status=status,
            code=code,
        )
        self.permission = permission


class PageError(ApiError):
    """A page that cannot be trusted: malformed JSON, missing `value`, truncated list."""

"""Collection errors: one hierarchy, each naming the endpoint, status and Microsoft error code."""

from __future__ import annotations


class CollectError(Exception):
    """Base class; messages never contain tokens or secrets."""


class AuthError(CollectError):
    """Sign-in to Entra ID failed (wrong secret, unknown tenant, ...).

    `scope` names the API scope whose token could not be had (None: before any scope).
    """

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        hint: str | None = None,
        scope: str | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code  # e.g. "AADSTS7000215"
        self.hint = hint
        self.scope = scope
        self.transient = transient  # 5xx / timeout / connection: worth retrying


class ApiError(CollectError):
    """An API call failed for good (after retries where retrying could help).

    `support` holds what Microsoft support asks for: Defender's `error.target`, Graph's
    `innerError.request-id` and `date`; it is part of the message.
    """

    def __init__(
        self,
        endpoint: str,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retryable: bool = False,
        support: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.status = status
        self.code = code
        self.retryable = retryable
        self.support = support
        self.detail = message
        where = f"{endpoint}: " if endpoint else ""
        status_part = f"HTTP {status}" if status is not None else "no response"
        code_part = f" {code}" if code else ""
        support_part = f" ({support})" if support else ""
        super().__init__(f"{where}{status_part}{code_part}: {message}{support_part}")


class PermissionMissing(ApiError):
    """403: the app registration lacks an application permission (or admin consent)."""

    def __init__(
        self,
        endpoint: str,
        permission: str,
        *,
        status: int = 403,
        code: str | None = None,
        support: str | None = None,
    ) -> None:
        super().__init__(
            endpoint,
            f"permission {permission} is missing or not admin-consented for this app registration",
            status=status,
            code=code,
            support=support,
        )
        self.permission = permission


# Defender's 403 codes that mean "the tenant does not have this feature", not "no permission".
FEATURE_DISABLED_CODES = frozenset({"DisabledFeature", "DisallowedOperation"})


class FeatureDisabled(ApiError):
    """403 DisabledFeature / DisallowedOperation: not enabled or not licensed in the tenant."""

    def __init__(
        self, endpoint: str, message: str, *, code: str | None, support: str | None = None
    ) -> None:
        super().__init__(
            endpoint,
            f"not enabled/licensed in this tenant: {message or 'the feature is not enabled'}",
            status=403,
            code=code,
            support=support,
        )


class NotFound(ApiError):
    """404 for one item (e.g. a machine's logon users)."""


class Throttled(ApiError):
    """429 on a call that must not wait for it (per-machine loops stop their batch instead)."""

    def __init__(
        self,
        endpoint: str,
        message: str,
        *,
        retry_after: float | None,
        code: str | None = None,
        support: str | None = None,
    ) -> None:
        super().__init__(endpoint, message, status=429, code=code, support=support)
        self.retry_after = retry_after


class PageError(ApiError):
    """A page that cannot be trusted: malformed JSON, missing `value`, truncated list."""

"""Error bodies shaped like Entra ID, Microsoft Graph and Defender for Endpoint send them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any

import orjson

# Status -> the error code each API uses for it.
GRAPH_CODES = {
    400: "BadRequest",
    401: "InvalidAuthenticationToken",
    403: "Authorization_RequestDenied",
    404: "Request_ResourceNotFound",
    409: "Conflict",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}
DEFENDER_CODES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "ResourceNotFound",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}
STATUS_MESSAGES = {
    400: "The request is invalid.",
    401: "The request is not authenticated.",
    403: "The request is not authorized.",
    404: "The requested resource was not found.",
    429: "Too many requests. Retry after the time given in the Retry-After header.",
    500: "An internal server error occurred.",
    502: "Bad gateway.",
    503: "The service is temporarily unavailable. Please retry later.",
    504: "The gateway timed out.",
}


def _now() -> datetime:
    return datetime.now(UTC)


def graph_error(status: int, message: str | None = None, code: str | None = None) -> dict[str, Any]:
    """`{"error": {"code", "message", "innerError": {...}}}` as Graph sends it."""
    now = _now()
    return {
        "error": {
            "code": code or GRAPH_CODES.get(status, "UnknownError"),
            "message": message or STATUS_MESSAGES.get(status, "An error occurred."),
            "innerError": {
                "date": now.strftime("%Y-%m-%dT%H:%M:%S"),
                "request-id": str(uuid.uuid4()),
                "client-request-id": str(uuid.uuid4()),
            },
        }
    }


def defender_error(
    status: int, message: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """`{"error": {"code", "message", "target"}}` as the Defender API sends it."""
    return {
        "error": {
            "code": code or DEFENDER_CODES.get(status, "InternalServerError"),
            "message": message or STATUS_MESSAGES.get(status, "An error occurred."),
            "target": str(uuid.uuid4()),
        }
    }


@cache
def recorded(name: str) -> Any:
    """A recorded Microsoft response shipped in monitor/simulator/recorded/ (parsed once)."""
    text = resources.files("monitor.simulator").joinpath("recorded", name).read_bytes()
    return orjson.loads(text)


def _aad_body(error: str, code: int, description: str, separator: str = "\r\n") -> dict[str, Any]:
    now = _now()
    ts = now.strftime("%Y-%m-%d %H:%M:%SZ")
    trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
    text = (
        f"AADSTS{code}: {description}{separator}Trace ID: {trace}{separator}"
        f"Correlation ID: {corr}{separator}Timestamp: {ts}"
    )
    return {
        "error": error,
        "error_description": text,
        "error_codes": [code],
        "timestamp": ts,
        "trace_id": trace,
        "correlation_id": corr,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }


def aad_invalid_client_secret(client_id: str) -> tuple[int, dict[str, Any]]:
    """401 AADSTS7000215, the recorded body with fresh ids and this app's client id."""
    rec = recorded("aad_token_error_invalid_client.json")
    body = _aad_body(
        rec["body"]["error"],
        7000215,
        "Invalid client secret provided. Ensure the secret being sent in the request is the"
        " client secret value, not the client secret ID, for a secret added to app"
        f" '{client_id}'.",
    )
    return rec["status"], body


def aad_invalid_tenant(tenant: str) -> tuple[int, dict[str, Any]]:
    """400 AADSTS900023, the recorded body with fresh ids and this tenant identifier."""
    rec = recorded("aad_token_error_invalid_tenant.json")
    body = _aad_body(
        rec["body"]["error"],
        900023,
        f"Specified tenant identifier '{tenant}' is neither a valid DNS name, nor a valid"
        " external domain.",
        separator=" ",
    )
    return rec["status"], body


def aad_error(status: int, error: str, code: int, description: str) -> tuple[int, dict[str, Any]]:
    """Any other Entra ID token-endpoint error in the same shape."""
    return status, _aad_body(error, code, description)

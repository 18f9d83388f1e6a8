"""Bearer-token check for admin routes (reset, restore, snapshot save, feedback).

Admin routes change what every client gets back, so when ``admin_token`` is configured they need
``Authorization: Bearer <token>``; without a token configured they are open (local use). The token
comes from the app's settings, never a global, and is compared in constant time.
"""

from __future__ import annotations

import secrets

from fastapi import Request

from service.http.errors import ApiError
from service.settings import Settings

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def check_bearer(authorization: str | None, expected: str) -> None:
    """Raise 401 unless ``authorization`` is ``Bearer <expected>``."""
    if not authorization:
        raise ApiError(401, "admin route: missing 'Authorization: Bearer <token>' header", _CHALLENGE)
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "admin route: expected 'Authorization: Bearer <token>'", _CHALLENGE)
    if not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise ApiError(401, "admin route: invalid bearer token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})


async def require_admin(request: Request) -> None:
    """FastAPI dependency guarding admin routes with the configured token (open when none is set)."""
    settings: Settings = request.app.state.settings
    token = settings.admin_token.get_secret_value() if settings.admin_token is not None else ""
    if not token:  # unset, or set to the empty string (``TTA_ADMIN_TOKEN=``): open
        return
    check_bearer(request.headers.get("authorization"), token)

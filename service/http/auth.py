"""Bearer-token check for admin routes (reset, restore, snapshot save, feedback).

Admin routes change what every client gets back, so when ``admin_token`` is configured they need
``Authorization: Bearer <token>``. Without a token they are open only while the server listens on a
loopback address (local use); on any other address they are refused with 403, unless the operator
explicitly allows it (``allow_unauthenticated_admin``). The token comes from the app's settings, never
a global, and is compared in constant time.
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
    """FastAPI dependency guarding admin routes (see the module docstring for the three cases)."""
    settings: Settings = request.app.state.settings
    access = settings.admin_access()
    if access == "open":
        return
    if access == "refused":
        raise ApiError(
            403,
            f"admin routes are disabled: the server listens on {settings.host} (not a loopback address) and no "
            "admin token is set. Set TTA_ADMIN_TOKEN (or admin_token in the config file) and send "
            "'Authorization: Bearer <token>'",
        )
    check_bearer(request.headers.get("authorization"), settings.admin_token.get_secret_value())  # type: ignore[union-attr]

"""Request-level limits that run before any route: body size and the API key."""
from __future__ import annotations

import hmac
import json

from bunny.serve.schemas import ApiError, error_body


class BodyLimit:
    """ASGI middleware: answer 413 when a request body exceeds `max_bytes`.

    The declared Content-Length is checked first; a body sent in chunks (or with a false
    length) is counted as it arrives and refused the moment it passes the limit, so an
    oversized upload is never held in memory whole.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                return await self._refuse(send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the client's disconnect, as usual

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        body = json.dumps(error_body(f"the request body is over the limit of {self.max_bytes} bytes",
                                     "invalid_request_error", "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def check_api_key(authorization: str | None, api_key: str | None) -> None:
    """Raise a 401 ApiError unless `Authorization: Bearer <api_key>` (no key set: open)."""
    if api_key is None:
        return
    if not authorization:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                       "invalid_api_key")
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise ApiError(401, "incorrect API key provided", "authentication_error", "invalid_api_key")

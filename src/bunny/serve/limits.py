"""Request-level limits that run before any route: body size and the API key."""
from __future__ import annotations

import asyncio
import hmac
import json
import time

from bunny.serve.schemas import ApiError, error_body

DRAIN_MAX_BYTES = 1 << 30  # at most this much of a refused body is read and discarded ...
DRAIN_MAX_S = 30.0  # ... for at most this long (nginx's lingering close waits 30 s too)


class BodyLimit:
    """ASGI middleware: answer 413 when a request body exceeds `max_bytes`.

    The declared Content-Length is checked first; a body sent in chunks (or with a false
    length) is counted as it arrives and refused the moment it passes the limit, so an
    oversized upload is never held in memory whole.

    A client that sends its whole body before reading the answer (most HTTP clients) would
    see a connection reset if the server closed the socket with the body still unread: the
    kernel answers unread data with a reset, which discards the 413 on its way. So the rest
    of a refused body is read and thrown away first (up to `drain_max_bytes`, for at most
    `drain_max_s` seconds), then the 413 is sent. A client that asked `Expect:
    100-continue` has sent nothing yet and is answered at once.
    """

    def __init__(self, app, max_bytes: int, drain_max_bytes: int = DRAIN_MAX_BYTES,
                 drain_max_s: float = DRAIN_MAX_S):
        self.app, self.max_bytes = app, max_bytes
        self.drain_max_bytes, self.drain_max_s = drain_max_bytes, drain_max_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if headers.get(b"expect", b"").lower() == b"100-continue":
                return await self._refuse(send)  # the body was never sent
            return await self._drain_and_refuse(receive, send, more_body=True)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            more = message.get("more_body", False)
            total += len(body)
            if total > self.max_bytes:
                return await self._drain_and_refuse(receive, send, more_body=more)
            chunks.append(body)
            if not more:
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the client's disconnect, as usual

        await self.app(scope, replay, send)

    async def _drain_and_refuse(self, receive, send, more_body: bool) -> None:
        """Read and discard what is left of the body (bounded), then answer 413."""
        drained, deadline = 0, time.monotonic() + self.drain_max_s
        while more_body and drained <= self.drain_max_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                break
            if message["type"] == "http.disconnect":
                return
            drained += len(message.get("body", b""))
            more_body = message.get("more_body", False)
        await self._refuse(send)

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

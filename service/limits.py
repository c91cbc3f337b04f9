"""Request body size limit, enforced on the bytes that actually arrive.

A ``Content-Length`` over the limit is refused before anything is read; a body without one (chunked) or one that
lies about its length is counted as it streams in and refused as soon as it passes the limit, so no client can make
the service buffer more than the limit.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BODY_LIMIT_ADVICE, BodyTooLargeError, error_response
from service.schemas import ErrorBody


class BodySizeLimit:
    """ASGI middleware answering 413 (JSON ErrorBody) for request bodies over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            body = ErrorBody(error="body_too_large", message=f"request body of {declared} bytes is over the limit "
                                                             f"of {self.max_bytes} bytes: {BODY_LIMIT_ADVICE}")
            await error_response(413, body, {"Connection": "close"})(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes, received)
            return message

        await self.app(scope, counted_receive, send)

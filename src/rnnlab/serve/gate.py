"""Flow control for the server: the gate that lets a few decodes run at once and queues the rest, the stream
that holds a slot while it sends, and the middleware that refuses an oversized body before it is read."""
from __future__ import annotations

import asyncio
import collections

import anyio
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException

from .api import ApiJSON


# --- the concurrency gate ---------------------------------------------------------------------------------------

class Gate:
    """At most `size` decodes at once, first come first served; a request waits `wait` seconds at most. A slot
    that frees passes straight to the oldest waiting request. Entered and left on the server's event loop
    only, so the counter and the queue need no lock."""

    def __init__(self, size: int, wait: float):
        self.size, self.wait, self.busy = size, wait, 0
        self.queue: collections.deque = collections.deque()      # futures of the waiting requests, oldest first

    async def enter(self) -> None:
        if self.busy < self.size and not self.queue:
            self.busy += 1
            return
        if self.wait > 0:
            handed = asyncio.get_running_loop().create_future()
            self.queue.append(handed)
            try:
                await asyncio.wait_for(handed, self.wait)
                return
            except asyncio.TimeoutError:
                if handed.done() and not handed.cancelled():     # handed over as the wait ran out
                    return
            except asyncio.CancelledError:                       # the client left while waiting
                if handed.done() and not handed.cancelled():
                    self.leave()
                raise
            finally:
                if handed in self.queue:
                    self.queue.remove(handed)
        raise HTTPException(503, f"the server is busy: {self.size} requests are being decoded "
                                 "(--max-concurrent); try again shortly", {"Retry-After": "1"})

    def leave(self) -> None:
        while self.queue:
            handed = self.queue.popleft()
            if not handed.done():
                handed.set_result(True)             # the slot stays taken, by the oldest waiting request
                return
        self.busy -= 1

    def leaver(self):
        """`leave`, once, however often it is called."""
        left = False

        def leave():
            nonlocal left
            if not left:
                left = True
                self.leave()
        return leave

    async def run(self, fn, *args):
        """fn(*args) in a worker thread, holding a slot."""
        await self.enter()
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        finally:
            self.leave()


class GatedStream(StreamingResponse):
    """A stream that gives its slot back when it ends, is cancelled, or never starts."""

    def __init__(self, content, leave, **kwargs):
        super().__init__(content, **kwargs)
        self.leave = leave

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.leave()

# --- the body limit ---------------------------------------------------------------------------------------------

class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 before any handler reads it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(scope, receive, send, declared)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(scope, receive, send, None)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}
        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, declared) -> None:
        if declared is not None and not declared.isdigit():
            response = ApiJSON({"error": "the Content-Length header is not a number"}, 400)
        else:
            response = ApiJSON({"error": f"the request body is larger than this server's {self.max_bytes:,} "
                                         "bytes (--max-request-bytes)"}, 413)
        response.headers["Connection"] = "close"
        await response(scope, receive, send)

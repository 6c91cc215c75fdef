"""The HTTP server over one loaded `lm.LM`: JSON endpoints, a server-sent-event stream, and the page at `/`.

    POST /v1/generate   continue a prompt (every `GenerateConfig` option); "stream": true sends events
    POST /v1/score      the surprisal of every character of a text, with the likeliest alternatives
    GET  /v1/model      what the model is, how it was trained (its metrics records), the server's limits
    GET  /healthz       liveness
    GET  /              the page; /openapi.json and /docs describe the API

No ML logic lives here: prompts, options, decoding and scoring are `LM`'s. The model is loaded once and only
read. Decoding is CPU-bound, so it runs in worker threads, at most `Limits.max_concurrent` at once; a request
that finds no slot within `Limits.queue_timeout` is refused with 503. Every error a client can cause is a 4xx
whose JSON body is {"error": "one line"} (validation errors add "errors": one entry per field).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import socket
import time
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException

from .. import __version__
from ..config import GenerateConfig
from ..errors import RnnlabError
from ..fileio import dumps_json
from . import Limits

STATIC = Path(__file__).parent / "static"
INT64_MAX = 2 ** 63 - 1
MAX_TOP = 20              # alternatives shown per scored character
MAX_STOPS, MAX_STOP_CHARS = 16, 200
BATCH_S = 0.03            # a stream sends what was decoded in this long at once


class ApiJSON(JSONResponse):
    """Strict JSON: a non-finite float (an infinite perplexity) becomes null instead of an error."""

    def render(self, content) -> bytes:
        return dumps_json(content, ensure_ascii=False).encode("utf-8")


# --- requests ---------------------------------------------------------------------------------------------------

def _opt(name: str, **constraints):
    """A request field with GenerateConfig's default and help text."""
    f = next(f for f in dataclasses.fields(GenerateConfig) if f.name == name)
    return Field(f.default, description=f.metadata["help"], **constraints)


STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
StopText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class GenerateRequest(BaseModel):
    """The options of `rnnlab generate`, by their GenerateConfig names (`prompt` is its `prefix`)."""
    model_config = STRICT
    prompt: str | None = _opt("prefix")
    num_preds: int = _opt("num_preds", ge=0)
    temperature: float | None = _opt("temperature", ge=0)
    top_k: int = _opt("top_k", ge=0)
    top_p: float = _opt("top_p", gt=0, le=1)
    beam: int = _opt("beam", ge=0)
    length_penalty: float = _opt("length_penalty", ge=0)
    num_samples: int = _opt("num_samples", ge=1)
    stop: list[StopText] = Field([], max_length=MAX_STOPS, description=_opt("stop").description)
    seed: int = _opt("seed", ge=0, le=INT64_MAX)
    stream: bool = Field(False, description="send the text as server-sent events as it is made: `prompt`, "
                                            "then one `piece` per piece, then `done` (or `error`)")


class ScoreRequest(BaseModel):
    model_config = STRICT
    text: str = Field(description="the text to score; its first character is context only")
    top: int = Field(5, ge=0, le=MAX_TOP, description="alternatives shown per character, likeliest first")


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


def _event(name: str, data) -> str:
    return f"event: {name}\ndata: {dumps_json(data, ensure_ascii=False)}\n\n"


def _next_pieces(pieces) -> list:
    """What `pieces` yields in BATCH_S (at least one piece, or [] once it is done); run in a worker thread."""
    out, start = [], time.monotonic()
    for piece in pieces:
        out.append(piece)
        if time.monotonic() - start >= BATCH_S:
            break
    return out


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


# --- errors -----------------------------------------------------------------------------------------------------

def _field(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _validation_error(request: Request, exc: RequestValidationError) -> ApiJSON:
    errors = exc.errors()
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        reason = (bad_json.get("ctx") or {}).get("error", "")
        return ApiJSON({"error": f"the body is not valid JSON{': ' + reason if reason else ''}"}, 400)
    if any(e.get("loc") == ("body",) and e.get("type") == "missing" for e in errors):
        return ApiJSON({"error": "the request needs a JSON object as its body"}, 422)
    rows = [{"field": _field(e.get("loc", ())), "message": e.get("msg", "invalid")} for e in errors]
    line = "; ".join(f"{r['field']}: {r['message']}" for r in rows)
    return ApiJSON({"error": line, "errors": rows}, 422)


def _install_errors(app: FastAPI) -> None:
    async def validation(request, exc):
        return _validation_error(request, exc)

    async def http(request, exc: HTTPException):
        return ApiJSON({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    async def user(request, exc: RnnlabError):
        return ApiJSON({"error": str(exc)}, 422)

    async def bug(request, exc: Exception):
        return ApiJSON({"error": f"internal error ({type(exc).__name__}); the server log has the details"}, 500)

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(RnnlabError, user)
    app.add_exception_handler(Exception, bug)


def _at_most(what: str, value: int, limit: int, flag: str) -> None:
    if value > limit:
        raise HTTPException(422, f"{what} is {value:,}; this server allows at most {limit:,} ({flag})")


# --- the app ----------------------------------------------------------------------------------------------------

def create_app(lm, limits: Limits | None = None) -> FastAPI:
    """The server for one loaded model. `lm` is only read; `limits` bound every request."""
    limits = limits or Limits()
    limits.validate()
    gate = Gate(limits.max_concurrent, limits.queue_timeout)
    info = {**lm.info(), "limits": dataclasses.asdict(limits), "version": __version__}
    app = FastAPI(title="rnnlab", version=__version__, default_response_class=ApiJSON,
                  description="A character-level recurrent language model: generate, stream, score.")
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    _install_errors(app)
    app.state.lm, app.state.limits, app.state.gate = lm, limits, gate

    def plan(req: GenerateRequest):
        """The prompt and options of a request, checked against the limits before anything is decoded."""
        raw = req.prompt if req.prompt is not None else lm.prompts[0]
        _at_most("the prompt's length in characters", len(raw), limits.max_prompt_chars, "--max-prompt-chars")
        _at_most("num_preds", req.num_preds, limits.max_new_tokens, "--max-new-tokens")
        _at_most("num_samples", req.num_samples, limits.max_samples, "--max-samples")
        _at_most("beam", req.beam, limits.max_samples, "--max-samples")
        fields = req.model_dump(exclude={"prompt", "stream"})
        cfg = lm.options(prefix=raw, **{**fields, "stop": tuple(req.stop)})
        return lm.prompt(raw), cfg

    def described(prompt, cfg) -> dict:
        options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
        options.pop("prefix")
        return {"prompt": prompt.text, "options": options, "unknown": prompt.unknown,
                "unreachable_stops": lm.unreachable(cfg.stop)}

    @app.post("/v1/generate", summary="Continue a prompt")
    async def generate(req: GenerateRequest):
        """The prompt's continuations: {prompt, samples (each the prompt + its continuation), options,
        unknown (prompt characters the vocabulary lacks)}. With `"stream": true`, server-sent events."""
        prompt, cfg = plan(req)
        if req.stream:
            await gate.enter()
            leave = gate.leaver()
            return GatedStream(_events(prompt, cfg, described(prompt, cfg)), leave, media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        samples = await gate.run(lm.generate, prompt, cfg)
        return {**described(prompt, cfg), "samples": samples}

    async def _events(prompt, cfg, head):
        yield _event("prompt", head)
        pieces, parts = lm.stream(prompt, cfg), [[prompt.text] for _ in range(cfg.num_samples)]
        try:
            while batch := await anyio.to_thread.run_sync(_next_pieces, pieces):
                out = []
                for piece in batch:
                    parts[piece.sample].append(piece.text)
                    out.append(_event("piece", {"sample": piece.sample, "text": piece.text}))
                yield "".join(out)
        except RnnlabError as e:
            yield _event("error", {"error": str(e)})
            return
        yield _event("done", {"samples": ["".join(p) for p in parts]})

    @app.post("/v1/score", summary="Score a text")
    async def score(req: ScoreRequest):
        """{summary: tokens, bits and perplexity per token; rows: one per character with its log-probability,
        surprisal in bits and the `top` likeliest alternatives (the first character has none)}."""
        _at_most("the text's length in characters", len(req.text), limits.max_score_chars, "--max-score-chars")
        scored = await gate.run(lm.score, req.text, req.top)
        return {"summary": scored.summary(), "rows": scored.rows()}

    @app.get("/v1/model", summary="The model and its training run")
    async def model():
        """Architecture, corpus, vocabulary, held-out perplexity, prompts, the run's metrics records (for the
        perplexity curve) and this server's limits."""
        return info

    @app.get("/healthz", summary="Liveness")
    async def healthz():
        return {"status": "ok", "busy": gate.busy, "waiting": len(gate.queue)}

    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# --- running ----------------------------------------------------------------------------------------------------

def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or one line saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (socket.gaierror, OSError) as e:
        raise RnnlabError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise RnnlabError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def run(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on `sock` until interrupted (Ctrl-C or SIGTERM: requests in flight finish first)."""
    import uvicorn
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)).run(sockets=[sock])

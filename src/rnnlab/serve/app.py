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

import dataclasses
import socket
import time
from pathlib import Path

import anyio
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import RnnlabError
from ..fileio import dumps_json
from . import Limits
from .api import ApiJSON, GenerateRequest, ScoreRequest, install_errors
from .gate import BodyLimit, Gate, GatedStream

STATIC = Path(__file__).parent / "static"
BATCH_S = 0.03            # a stream sends what was decoded in this long at once


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
    install_errors(app)
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

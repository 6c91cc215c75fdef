"""What the HTTP API reads and writes: strict request models built from `GenerateConfig`, the JSON response
class, and the handlers that turn every error into {"error": "one line"} with a 4xx status."""
from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException

from ..config import GenerateConfig
from ..errors import RnnlabError
from ..fileio import dumps_json

INT64_MAX = 2 ** 63 - 1
MAX_TOP = 20              # alternatives shown per scored character
MAX_STOPS, MAX_STOP_CHARS = 16, 200


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


def install_errors(app: FastAPI) -> None:
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

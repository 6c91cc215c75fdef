"""`rnnlab serve`: a trained model over HTTP. `app.py` holds the endpoints (JSON in, `lm.LM` called, JSON out),
`api.py` the request models and JSON errors, `gate.py` the limit on concurrent decodes and request bodies,
`static/` the page at `/`, `loadtest.py` a small load generator. This module holds only what the command line
needs without the `serve` extra installed: the server's limits.

    from rnnlab.lm import LM
    from rnnlab.serve import Limits
    from rnnlab.serve.app import create_app       # needs fastapi: pip install 'rnnlab[serve]'
    app = create_app(LM.load("runs/book"), Limits(max_samples=4))
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config import option
from ..errors import RnnlabError


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; anything beyond is refused with a 4xx and a JSON error."""

    max_prompt_chars: int = option(2000, "longest prompt a generate request may give, in characters")
    max_new_tokens: int = option(1000, "most tokens one continuation may ask for (num_preds)")
    max_samples: int = option(8, "most continuations (num_samples) or beams (beam) in one request")
    max_score_chars: int = option(20000, "longest text a score request may give, in characters")
    max_request_bytes: int = option(262144, "largest request body, in bytes")
    max_concurrent: int = option(2, "decodes and scorings run at once; others wait for a slot, first come "
                                    "first served")
    queue_timeout: float = option(10.0, "seconds a request waits for a slot before it is refused with 503 "
                                        "(0: refuse at once)")

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if f.name == "queue_timeout":
                if not (value >= 0 and math.isfinite(value)):
                    raise RnnlabError(f"{flag} must be a finite number >= 0, got {value}")
            elif value < 1:
                raise RnnlabError(f"{flag} must be at least 1, got {value}")

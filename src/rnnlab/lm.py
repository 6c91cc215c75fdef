"""A trained model ready to use: a checkpoint made into a backend and a vocabulary, with prompts, generation and
scoring. `rnnlab generate`, `rnnlab score`, the samples logged during training and the HTTP server all go
through `LM`, so a prompt is read, and a text decoded or scored, the same way everywhere.

Shape legend: N = tokens in a text, V = vocab_size, K = alternatives shown per position.

A prompt is normalised exactly as the model's training text was (`text.normalize_prefix`): lower-cased for
the book's preprocessing, NFC for unicode, and so on. Characters the vocabulary lacks are reported by
`Prompt.unknown`, not printed as `<unk>`, and `<unk>` is never generated.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import decoding, evaluate, text
from .config import GenerateConfig, to_dict
from .errors import RnnlabError

SAMPLING_TEMPERATURE = 0.8    # the default for every model but the book's: greedy decoding of a model loops
SCORE_CHUNK = 1024            # positions whose log-probabilities are held at once while scoring


def is_book_model(data_cfg, model_cfg) -> bool:
    """Whether a model is the chapter's: one tanh RNN layer over one-hot characters of the book's text
    preprocessing. Its samples are greedy by default, as the book's `predict_ch8` is."""
    return (model_cfg.cell == "rnn" and model_cfg.num_layers == 1 and not model_cfg.embed_size
            and data_cfg.preprocess in ("d2l", "legacy") and data_cfg.token == "char")


@dataclass(frozen=True)
class Prompt:
    """A prompt as the model reads it: its text (normalised), token ids (N,), and the tokens the vocabulary
    lacks, with their counts (they are read as `<unk>`)."""
    text: str
    ids: np.ndarray
    unknown: dict[str, int]


@dataclass
class Scored:
    """Per-token scores of a text: tokens[i + 1] has -log P = nll[i] (nats) given tokens[: i + 1]; the first
    token is context only. top[i] lists the K most likely tokens at that position with their probabilities."""
    tokens: list[str]
    nll: np.ndarray                              # (N - 1,) nats
    top: list[list[tuple[str, float]]]           # (N - 1) x K
    unknown: dict[str, int]
    token: str = "char"

    def summary(self) -> dict:
        """Totals, as `rnnlab eval` reports them (nats, bits and perplexity per token)."""
        totals = evaluate.summarize(float(self.nll.sum()), len(self.nll))
        per = "char" if self.token == "char" else "token"
        return {**totals, "total_bits": float(self.nll.sum()) / math.log(2),
                f"bits_per_{per}": totals["bits_per_token"], "unknown": dict(self.unknown)}

    def rows(self) -> list[dict]:
        """One dict per token: position, token, log-probability (nats), surprisal (bits), whether the
        vocabulary lacks it, and the alternatives; the first token has no score."""
        out = [{"index": 0, "token": self.tokens[0], "logprob": None, "bits": None,
                "unknown": self.tokens[0] in self.unknown, "top": []}]
        for i, (nll, top) in enumerate(zip(self.nll, self.top), start=1):
            out.append({"index": i, "token": self.tokens[i], "logprob": -float(nll),
                        "bits": float(nll) / math.log(2), "unknown": self.tokens[i] in self.unknown,
                        "top": [{"token": t, "prob": p} for t, p in top]})
        return out


class LM:
    """A trained language model: a backend holding its weights, its vocabulary and configs."""

    def __init__(self, backend, vocab, data_cfg, model_cfg, train_cfg=None, checkpoint=None, directory=None):
        self.backend, self.vocab = backend, vocab
        self.data_cfg, self.model_cfg, self.train_cfg = data_cfg, model_cfg, train_cfg
        self.checkpoint, self.directory = checkpoint, directory
        self.joiner = "" if data_cfg.token == "char" else " "
        # the text each token adds to a text it continues: "a", or " word"
        self.token_text = [self.joiner + t for t in vocab.idx_to_token]
        self.never = [vocab.unk]

    @classmethod
    def load(cls, directory, backend: str = "auto", device: str = "cpu") -> "LM":
        """Load a run directory's checkpoint. On the CPU, `auto` decodes with numpy: one token at a time is
        latency-bound, and numpy's small calls beat torch's there."""
        from .backends import resolve_device
        from .checkpoint import load_model
        if backend == "auto" and resolve_device(device) == "cpu":
            backend = "numpy"
        m = load_model(directory, backend, device)
        return cls(m.backend, m.vocab, m.data_cfg, m.model_cfg, m.train_cfg, m.checkpoint, directory)

    # --- prompts and options -----------------------------------------------------------------------------------

    @property
    def prompts(self) -> tuple[str, ...]:
        """The run's own prompts (those its training samples used), or a line start when it has none."""
        return tuple(self.train_cfg.prefixes) if self.train_cfg and self.train_cfg.prefixes else ("\n",)

    def prompt(self, raw: str) -> Prompt:
        """A user's prompt mapped into the model's alphabet (`text.normalize_prefix`: a trailing space stays,
        a line break under d2l becomes a space), as ids; an error when nothing is left."""
        normalised = text.normalize_prefix(raw, self.data_cfg.preprocess)
        if not text.tokenize(normalised, self.data_cfg.token):
            raise RnnlabError("the prompt is empty once normalised: give at least one character to warm up on")
        return self._encode(normalised)

    def read(self, raw: str) -> Prompt:
        """A whole text preprocessed exactly as the training text was (`text.preprocess`, as `rnnlab eval`
        reads a file: under d2l, lines are stripped and joined), as ids."""
        return self._encode(text.preprocess(raw, self.data_cfg.preprocess, self.data_cfg.token))

    def _encode(self, normalised: str) -> Prompt:
        tokens = list(text.tokenize(normalised, self.data_cfg.token))
        ids = np.array(self.vocab[tokens], dtype=np.int64)
        unknown = Counter(t for t, i in zip(tokens, ids) if i == self.vocab.unk and t != "<unk>")
        return Prompt(self.joiner.join(tokens), ids, dict(unknown.most_common()))

    def options(self, cfg: GenerateConfig | None = None, **changes) -> GenerateConfig:
        """`cfg` (default: the defaults) with `changes` applied, checked, and the temperature decided: greedy
        for the book's model, SAMPLING_TEMPERATURE for any other (and irrelevant to beam search)."""
        cfg = dataclasses.replace(cfg or GenerateConfig(), **changes)
        cfg.validate()
        if cfg.temperature is None:
            book = is_book_model(self.data_cfg, self.model_cfg) or cfg.beam
            cfg = dataclasses.replace(cfg, temperature=0.0 if book else SAMPLING_TEMPERATURE)
        return cfg

    def unreachable(self, stops) -> list[str]:
        """The stop texts this model can never write: they hold a character its vocabulary lacks."""
        if self.data_cfg.token != "char":
            return []
        return [s for s in stops if any(self.vocab[c] == self.vocab.unk for c in s)]

    # --- generation --------------------------------------------------------------------------------------------

    def stream(self, prompt: str | Prompt, cfg: GenerateConfig) -> Iterator[decoding.Piece]:
        """The continuations of one prompt as they are made (the prompt itself is not repeated)."""
        cfg = self.options(cfg)
        p = prompt if isinstance(prompt, Prompt) else self.prompt(prompt)
        step, state = self.backend.decoder(), self.backend.begin_state(1)
        if cfg.beam:
            best = decoding.beam_search(step, state, p.ids, self.token_text, cfg.num_preds, cfg.beam,
                                        cfg.num_samples, cfg.length_penalty, cfg.stop, self.never)
            for rank, hyp in enumerate(best):
                yield decoding.Piece(rank, hyp.text)
            return
        yield from decoding.stream(step, state, p.ids, self.token_text, cfg.num_preds, cfg.temperature,
                                   cfg.top_k, cfg.top_p, cfg.num_samples, cfg.stop, cfg.seed, self.never)

    def generate(self, prompt: str | Prompt, cfg: GenerateConfig | None = None, **changes) -> list[str]:
        """`num_samples` texts, each the prompt (as the model reads it) followed by its continuation: the text
        `stream` makes (`decoding.continuations`)."""
        cfg = self.options(cfg, **changes)
        p = prompt if isinstance(prompt, Prompt) else self.prompt(prompt)
        if cfg.beam:
            texts = decoding.joined(self.stream(p, cfg), cfg.num_samples)
        else:
            step, state = self.backend.decoder(), self.backend.begin_state(1)
            texts = decoding.continuations(step, state, p.ids, self.token_text, cfg.num_preds, cfg.temperature,
                                           cfg.top_k, cfg.top_p, cfg.num_samples, cfg.stop, cfg.seed, self.never)
        return [p.text + text for text in texts]

    # --- scoring -----------------------------------------------------------------------------------------------

    def score(self, raw: str, top: int = 5) -> Scored:
        """Score every token of a text given the ones before it, the state carried: the text read and scored
        as `rnnlab eval --split all` reads and scores a file (`evaluate.stream_nll`), here with the K most
        likely tokens at each position."""
        if not raw:
            raise RnnlabError("the text is empty: at least 2 characters are needed to score (the first is context)")
        p = self.read(raw)
        if len(p.ids) < 2:
            unit = "characters" if self.data_cfg.token == "char" else "words"
            raise RnnlabError(f"the text has {len(p.ids)} {unit[:-1] if len(p.ids) == 1 else unit} once "
                              f"preprocessed: at least 2 are needed to score (the first is context)")
        if not 0 <= top <= len(self.vocab):
            raise RnnlabError(f"the alternatives shown must be between 0 and {len(self.vocab)}, got {top}")
        step, state = self.backend.decoder(), self.backend.begin_state(1)
        ids, nll, alternatives = p.ids, [], []
        for start in range(0, len(ids) - 1, SCORE_CHUNK):
            stop = min(start + SCORE_CHUNK, len(ids) - 1)
            rows = []
            for i in range(start, stop):
                logits, state = step(ids[i:i + 1], state)
                rows.append(np.asarray(logits, dtype=np.float64)[0])
            logp = decoding.log_softmax(np.stack(rows))                       # (chunk, V)
            nll.append(-logp[np.arange(stop - start), ids[start + 1:stop + 1]])
            best = np.argsort(-logp, axis=1, kind="stable")[:, :top]
            alternatives += [[(self.vocab.idx_to_token[j], float(np.exp(lp[j]))) for j in row]
                             for row, lp in zip(best, logp)]
        tokens = list(text.tokenize(p.text, self.data_cfg.token))
        return Scored(tokens, np.concatenate(nll), alternatives, p.unknown, self.data_cfg.token)

    # --- description -------------------------------------------------------------------------------------------

    def info(self) -> dict:
        """What the model is and how it was trained: architecture, corpus, vocabulary, its metrics records."""
        from .limits import num_params
        from .rundir import records_for
        m, d = self.model_cfg, self.data_cfg
        records = []
        if self.checkpoint is not None and self.directory is not None:
            try:
                records, _ = records_for(Path(self.directory), self.checkpoint)
            except RnnlabError:
                records = []                           # a damaged metrics file: the model still serves
        last = records[-1] if records else {}
        return {"architecture": to_dict(m),
                "num_params": num_params(len(self.vocab), m.num_hiddens, m.num_layers, m.cell, m.embed_size,
                                         m.cell_variant),
                "data": {"corpus": Path(d.corpus).name, "preprocess": d.preprocess, "token": d.token,
                         "sha256": (self.checkpoint.extra.get("corpus_sha256") if self.checkpoint else None),
                         "extra_text": [Path(name).name for name in d.extra_text]},
                "vocab": {"size": len(self.vocab), "tokens": list(self.vocab.idx_to_token)},
                "epoch": self.checkpoint.epoch if self.checkpoint else None,
                "heldout_perplexity": last.get("val_ppl"),
                "heldout_bits_per_token": last.get("val_bits_per_token"),
                "prompts": list(self.prompts),
                "default_temperature": self.options().temperature,
                "metrics": [{k: r.get(k) for k in ("epoch", "step", "progress", "train_ppl", "val_ppl")}
                            for r in records]}

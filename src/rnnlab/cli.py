"""Command-line interface: `rnnlab train | prepare | generate | eval | score | baseline | sweep | bench | corpora |
serve`.

Flags are generated from the config dataclasses (one flag per field, its help and default shown in --help).
Entry points are thin: parse, build configs, call the library, print. `main(argv)` returns the exit code.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import sys
import time
import typing
from pathlib import Path

from . import __version__, presets
from .backends import check_device, denormals_flushed, device_of, set_threads
from .config import DataConfig, EvalConfig, GenerateConfig, ModelConfig, TrainConfig, validate_sizes
from .errors import RnnlabError
from .fileio import dumps_json
from .sweep import VARIANTS

INT64_MAX = 2 ** 63 - 1
SCORE_MAX_CHARS = 100_000       # `rnnlab score` refuses longer texts unless --max-chars is raised
_MISSING_VALUE = re.compile(r"argument (--[\w-]+)\S*: expected (one|at least one) argument")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (plus the exit status 2)."""

    def error(self, message):
        missing = _MISSING_VALUE.match(message)
        if missing:      # argparse takes a value such as "-abc" for an option
            message += f"; a value that starts with '-' is given as {missing[1]}=-abc"
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _shorten(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def finite_float(text: str) -> float:
    """argparse type: a finite number. nan and inf are refused: no run can use them and strict JSON
    cannot print them."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{_shorten(text)!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int64(text: str) -> int:
    """argparse type: an integer that fits in 64 bits, as every size, count and seed must to become an
    array dimension or index."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{_shorten(text)!r} is not an integer") from None
    if abs(value) > INT64_MAX:
        raise argparse.ArgumentTypeError(f"{_shorten(text)} is too large (at most 2**63 - 1)")
    return value


ARG_TYPES = {int: int64, float: finite_float}


def _flag(f: dataclasses.Field) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One flag per dataclass field; values land in the namespace as '<Class>.<field>' only when given."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        names = [_flag(f)]
        if f.metadata.get("flag"):
            names.append("--" + f.name.replace("_", "-"))    # the book's name as an alias (--theta)
        kwargs = {"dest": f"{cls.__name__}.{f.name}", "default": argparse.SUPPRESS,
                  "help": f"{f.metadata['help']} (default: {f.metadata.get('shown') or _show(f.default)})"}
        hint = hints[f.name]
        if typing.get_origin(hint) is tuple:
            kwargs.update(nargs="+", type=str, metavar=f.metadata.get("metavar") or "TEXT")
        else:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            kind = args[0] if args else hint
            kwargs["type"] = ARG_TYPES.get(kind, kind)
            kwargs["metavar"] = f.metadata.get("metavar") or {int: "N", float: "X"}.get(kind, "TEXT")
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
            kwargs.pop("metavar")
        group.add_argument(*names, **kwargs)


def _show(value) -> str:
    if isinstance(value, tuple):
        return " ".join(repr(v) for v in value)
    return repr(value) if isinstance(value, str) else str(value)


def given(ns: argparse.Namespace, cls) -> dict:
    """The fields of `cls` set explicitly on the command line."""
    prefix = cls.__name__ + "."
    return {k[len(prefix):]: (tuple(v) if isinstance(v, list) else v)
            for k, v in vars(ns).items() if k.startswith(prefix)}


def _add_backend_args(parser) -> None:
    parser.add_argument("--backend", default="auto", choices=("auto", "numpy", "torch", "jax"),
                        help="auto: torch when installed, else numpy; jax needs the jax extra (default: auto)")
    parser.add_argument("--device", default="auto", help="device: auto (cuda when present, else cpu), cpu, "
                        "cuda, cuda:N (default: auto)")
    parser.add_argument("--threads", type=int64, default=0, metavar="N",
                        help="torch CPU threads (default: 0, the CPUs this process may use less the load of other "
                             "processes, at most 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rnnlab", description="Character-level recurrent language models: the d2l §8.5 "
                     "RNN, reproduced exactly, with honest held-out evaluation.")
    parser.add_argument("--version", action="version", version=f"rnnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model (defaults: the book's run on The Time Machine)")
    train.add_argument("--out", metavar="DIR", help="run directory: metrics.jsonl, checkpoint, plot "
                       f"(default: a new {DEFAULT_RUNS}/<corpus>-<date>-<time>, named when training starts)")
    train.add_argument("--no-save", action="store_true", help="save nothing: no run directory (default: off)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out up to --num-epochs, from its last checkpoint, mid-epoch "
                            "or not (default: off)")
    train.add_argument("--init-from", metavar="DIR", help="start a new run from the weights and vocabulary of "
                       "this run's checkpoint (fine-tuning): the model stays, the corpus and every training "
                       "setting may change (default: none, fresh weights)")
    train.add_argument("--on-unknown", choices=("refuse", "unk"), default="refuse",
                       help="with --init-from, tokens of the corpus the vocabulary lacks: refuse (say which), "
                            "or map them to <unk> (default: refuse)")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out (default: off)")
    train.add_argument("--json", action="store_true", help="print the final metrics as JSON (default: off)")
    train.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    train.add_argument("--preset", choices=tuple(presets.PRESETS),
                       help="start from named settings (book: the §8.5 run; legacy: the early notebook's run; "
                            "timemachine, waroftheworlds, shakespeare: the best measured for that corpus; "
                            "timemachine-wells: The Time Machine with The War of the Worlds as more training "
                            "text); flags given override them (default: none, i.e. the book's)")
    for cls in (DataConfig, ModelConfig, TrainConfig):
        add_config_args(train, cls)

    gen = sub.add_parser("generate", help="continue a prompt with a trained model: greedy, sampled (temperature, "
                         "top-k, top-p) or beam search, several continuations at once, stop texts, streaming")
    gen.add_argument("--checkpoint", metavar="DIR", required=True, help="run directory of `rnnlab train`")
    add_config_args(gen, GenerateConfig)
    gen.add_argument("--stream", action="store_true", help="print the text as it is made; with several "
                     "continuations, the first as it is made and the others after it (default: off)")
    _add_backend_args(gen)
    gen.add_argument("--json", action="store_true", help="print the result as JSON (the samples as a list)")

    ev = sub.add_parser("eval", help="score held-out text: perplexity and bits per character")
    ev.add_argument("--checkpoint", metavar="DIR", required=True, help="run directory of `rnnlab train`")
    ev.add_argument("--corpus", help="corpus name or file (default: the one the model was trained on)")
    ev.add_argument("--data-dir", help="directory searched first for named corpora (default: the checkpoint's)")
    ev.add_argument("--split", default="val", choices=("val", "train", "all"),
                    help="val: the last --val-fraction of the corpus, as held out in training (default: val)")
    ev.add_argument("--dynamic-lr", type=finite_float, default=0.0, metavar="X",
                    help="dynamic evaluation: after scoring each segment, one SGD step of this size on it, so "
                         "the model adapts to the text as it reads it (default: 0, static evaluation)")
    ev.add_argument("--dynamic-steps", type=int64, default=64, metavar="N",
                    help="segment length of dynamic evaluation (default: 64)")
    ev.add_argument("--dynamic-decay", type=finite_float, default=0.0, metavar="X",
                    help="pull of dynamic evaluation back toward the trained weights per step (default: 0)")
    ev.add_argument("--dynamic-rule", default="sgd", choices=("sgd", "rms"),
                    help="sgd: clipped SGD steps; rms: each weight's step divided by the RMS of its gradients on "
                         "the last 20,000 tokens of the model's training split (Krause et al.'s rule; give an "
                         "--dynamic-lr around 1e-4 to 1e-3) (default: sgd)")
    ev.add_argument("--mix-ngram", type=int64, default=0, metavar="ORDER",
                    help="score the mixture of the model with a Kneser-Ney n-gram of this order fitted on the "
                         "model's own training split (default: 0, the model alone)")
    ev.add_argument("--mix-weight", type=finite_float, default=0.5, metavar="W",
                    help="weight of the model in the mixture; the n-gram gets 1 - W (default: 0.5)")
    add_config_args(ev, EvalConfig)
    _add_backend_args(ev)
    ev.add_argument("--json", action="store_true", help="print the result as JSON (default: off, a summary)")

    sc = sub.add_parser("score", help="how surprising each character of a text is to a model: bits per "
                        "character, the model's alternatives, the most surprising places; JSON, TSV or an "
                        "HTML page coloured by surprisal")
    sc.add_argument("file", nargs="?", metavar="FILE", help="UTF-8 text file to score; - reads stdin")
    sc.add_argument("--text", help="the text to score, given here instead of a FILE")
    sc.add_argument("--checkpoint", metavar="DIR", required=True, help="run directory of `rnnlab train`")
    sc.add_argument("--top", type=int64, default=5, metavar="K",
                    help="alternatives shown at each position, the model's K most likely (default: 5)")
    sc.add_argument("--max-chars", type=int64, default=SCORE_MAX_CHARS, metavar="N",
                    help="refuse a longer text: scoring takes one model step per character, about 5-20K "
                         f"characters/s on a CPU (default: {SCORE_MAX_CHARS})")
    fmt = sc.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the totals and one row per character as JSON "
                     "(default: off, a summary)")
    fmt.add_argument("--tsv", action="store_true", help="print one tab-separated row per character: index, "
                     "character, log-probability, bits, alternatives (default: off)")
    sc.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page that colours each "
                    "character by its surprisal (default: none)")
    _add_backend_args(sc)

    base = sub.add_parser("baseline", help="interpolated Kneser-Ney n-gram on the same split: perplexity and "
                          "bits per character")
    base.add_argument("--order", type=int64, nargs="+", default=[5], metavar="N",
                      help="n-gram order(s); several give one line each (default: 5)")
    base.add_argument("--checkpoint", metavar="DIR",
                      help="take the corpus, preprocessing and split from this run (default: the flags below)")
    add_config_args(base, DataConfig)
    base.add_argument("--json", action="store_true",
                      help="print one JSON line per order (default: off, one readable line per order)")

    sw = sub.add_parser("sweep", help="the book's exercise grid: one change at a time from a base run, each "
                        "under a time budget; writes a markdown table and a plot")
    sw.add_argument("--out", metavar="DIR", required=True, help="one run directory per variant, plus "
                    "sweep.md, sweep.json and sweep.png")
    sw.add_argument("--overwrite", action="store_true",
                    help="replace the runs of an earlier sweep in --out (default: off)")
    sw.add_argument("--budget", type=finite_float, default=2.0, metavar="MINUTES",
                    help="training time per variant (default: 2.0)")
    sw.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                    help=f"which variants, from: {', '.join(repr(v) for v in VARIANTS)} (default: all)")
    for cls in (DataConfig, ModelConfig, TrainConfig):
        add_config_args(sw, cls)

    bench = sub.add_parser("bench", help="speed of every training, generation and data path, side by side "
                           "with the book's implementation")
    bench.add_argument("--configs", nargs="+", default=["book", "big", "word", "lstm"],
                       choices=["book", "big", "word", "lstm"],
                       help="book: B=32 H=512 chars; big: B=128 H=1024; word: word level, V=4,580; lstm: a "
                            "2-layer LSTM, H=384, E=64, B=32, T=64 (ratios to torch autograd) (default: all)")
    bench.add_argument("--sections", nargs="+", default=["train", "generate", "data"],
                       choices=["train", "generate", "data"], help="what to measure (default: all)")
    bench.add_argument("--repeats", type=int64, default=5, metavar="N", help="timed repeats, median reported "
                       "(default: 5)")
    bench.add_argument("--warmup", type=int64, default=1, metavar="N", help="untimed warm-up calls (default: 1)")
    bench.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    bench.add_argument("--data-dir", help="directory searched first for The Time Machine")
    bench.add_argument("--quick", action="store_true", help="tiny shapes: checks that every path runs")
    bench.add_argument("--no-compile", action="store_true",
                       help="leave out the torch.compile path (it compiles for tens of seconds per config)")
    bench.add_argument("--json", action="store_true", help="print the result as JSON")

    _add_prepare_parser(sub)

    corp = sub.add_parser("corpora", help="named corpora: where they were found and whether the hash is right")
    corp.add_argument("--data-dir", help="directory searched first")
    corp.add_argument("--json", action="store_true", help="print as JSON")

    from .serve import Limits
    srv = sub.add_parser("serve", help="serve a trained model over HTTP: a JSON API (generate, stream, score) "
                         "and a page to try it at /")
    srv.add_argument("--checkpoint", metavar="DIR", required=True, help="run directory of `rnnlab train`")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface "
                     "(default: 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int64, default=8000, metavar="N", help="port (0: any free one; "
                     "default: 8000)")
    add_config_args(srv, Limits)
    _add_backend_args(srv)
    srv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                     help="what the server logs; info logs every request (default: info)")
    return parser


DEFAULT_RUNS = "runs"


def default_out(corpus: str) -> Path:
    """A new run directory under runs/, named by the corpus and the time: runs/<corpus>-<YYYYmmdd-HHMMSS>."""
    stem = re.sub(r"[^\w.-]+", "_", Path(corpus).stem)[:40] or "run"
    base = Path(DEFAULT_RUNS) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _add_prepare_parser(sub) -> None:
    from .text import PREPROCESS_MODES
    prep = sub.add_parser("prepare", help="encode a text of any size once into a token file that `rnnlab train "
                          "--data DIR` reads from disk")
    prep.add_argument("text", metavar="TEXT", help="UTF-8 text file, or a named corpus")
    prep.add_argument("--out", metavar="DIR", required=True, help="directory for prepared.json and the token file "
                      "(new, empty, or holding a prepared text to replace with --overwrite)")
    own = presets.PRESETS["text"]["data"]["preprocess"]
    prep.add_argument("--preprocess", choices=PREPROCESS_MODES, default=own, help="as `rnnlab train "
                      f"--preprocess`; legacy cannot be prepared (default: {own})")
    prep.add_argument("--token", choices=("char", "word"), default="char", help="token type (default: char)")
    prep.add_argument("--val-fraction", type=finite_float, default=0.1, metavar="X",
                      help="last fraction of the encoded text held out, never trained on (default: 0.1)")
    prep.add_argument("--overwrite", action="store_true", help="replace a prepared text already in --out "
                      "(default: off)")
    prep.add_argument("--json", action="store_true", help="print the summary as JSON (default: off)")
    prep.add_argument("--quiet", action="store_true", help="no progress line (default: off)")


def _train_settings(ns) -> tuple[dict, dict, dict, str | None]:
    """The data, model and train settings of a new run: the preset (or the defaults for the corpus given)
    overridden by the flags given; and a note saying which defaults apply, if it needs saying. With --data, the
    prepared text's preprocess, token and val_fraction are taken as given (a flag that differs is an error)."""
    data, model, train_cfg = given(ns, DataConfig), given(ns, ModelConfig), given(ns, TrainConfig)
    if "prepared" in data and not ns.resume:
        from .prepared import settings
        data = settings(data)
    if ns.resume or ns.init_from:
        if ns.preset:
            raise RnnlabError(f"--preset applies to a new run; {'--resume' if ns.resume else '--init-from'} "
                              "takes the settings of its checkpoint (give flags to change what may change)")
        return data, model, train_cfg, None
    return presets.resolve(ns.preset, data, model, train_cfg)


def cmd_train(ns) -> int:
    """`rnnlab train`, alone or as one of the ranks torchrun starts (distributed.py): then every rank trains
    and rank 0 alone writes the run directory and prints; an error every rank meets alike is said once."""
    from . import distributed
    world = distributed.init()
    try:
        return _train(ns, world)
    except RnnlabError:             # the same on every rank (agreed failures, divergence): said once
        if world.main:
            raise
        return 1
    except RuntimeError as e:       # a collective whose peer is gone (rank 0 says what went wrong, once)
        if world.main or not world.distributed:
            raise
        print(f"rnnlab train: rank {world.rank}: stopped: another rank stopped ({type(e).__name__})",
              file=sys.stderr)
        return 1
    finally:
        distributed.shutdown(world)


def _train(ns, world) -> int:
    from . import distributed
    from . import train as training
    say = functools.partial(print, file=sys.stderr) if world.main else (lambda *args, **kwargs: None)
    run = writer = error = preset_note = None
    try:                            # on any rank, a failure here must reach the others (world.agree)
        data, model, train_cfg, preset_note = _checked_settings(ns)
        if ns.resume:
            run = training.resume_run(ns.out, data, model, train_cfg, world)
        elif ns.init_from:
            run = training.start_from(ns.init_from, data, model, train_cfg, ns.on_unknown)
        else:
            run = training.new_run(DataConfig(**data), ModelConfig(**model), TrainConfig(**train_cfg))
        run.world = world
        distributed.check(world, run.train_cfg.batch_size, run.backend.name)
        out = None if ns.no_save else Path(ns.out) if ns.out else default_out(run.data_cfg.corpus)
        if out and world.main:
            writer = training.open_writer(run, out, ns.overwrite)     # fails before training
    except (RnnlabError, OSError) as e:
        if not world.distributed:
            raise
        error = os_error_line(e) if isinstance(e, OSError) else str(e)
    try:
        world.agree(error)
        return _fit(ns, run, writer, out, preset_note, say)
    finally:
        if writer is not None:
            writer.close()


def _checked_settings(ns) -> tuple[dict, dict, dict, str | None]:
    """The flags of `rnnlab train` checked together: the settings of the run (see `_train_settings`)."""
    if ns.out is not None and not ns.out.strip():
        raise RnnlabError("--out is empty; give the run directory (or --no-save to save nothing)")
    if ns.no_save and (ns.out or ns.resume):
        raise RnnlabError("--no-save saves nothing: it goes with neither --out nor --resume")
    if ns.resume and ns.init_from:
        raise RnnlabError("--resume continues a run and --init-from starts a new one: give one of them")
    data, model, train_cfg, preset_note = _train_settings(ns)
    check_device(train_cfg.get("device", "auto"), train_cfg.get("backend", "auto"))
    if ns.resume and (not ns.out or ns.overwrite):
        raise RnnlabError("--resume needs --out DIR, the run to continue (and no --overwrite)")
    return data, model, train_cfg, preset_note


def _fit(ns, run, writer, out, preset_note: str | None, say) -> int:
    """Report what is about to train, train it, and print the result (rank 0 only)."""
    from . import train as training
    from .distributed import collectives
    world = run.world
    for note in [*([preset_note] if preset_note else []), *run.notes]:
        say(f"rnnlab train: note: {note}")
    if ns.resume and run.epoch >= run.train_cfg.num_epochs:
        say(f"{ns.out} is already at epoch {run.epoch}; nothing to train (raise --num-epochs)")
    elif ns.resume:
        say(f"resuming {ns.out} at {run.where()} of {run.train_cfg.num_epochs} epochs")
    d, c = run.dataset, run.train_cfg
    threads = getattr(run.backend, "threads", None)
    ranks = (f"; {world.size} ranks of {c.batch_size // world.size} rows each "
             f"({collectives(device_of(run.backend))})" if world.distributed else "")
    extra = (f" ({d.extra_tokens:,} of them from {', '.join(Path(name).name for name in run.data_cfg.extra_text)})"
             if d.extra_tokens else "")
    say(f"corpus {d.path.name}: {len(d.train):,} training{extra} / {len(d.val):,} held-out tokens, "
        f"vocab {len(d.vocab)}; backend {run.backend.name}, {c.dtype}, device {device_of(run.backend)}"
        + (f", {threads} thread{'s' if threads > 1 else ''}" if threads else "") + ranks)
    say(f"saving to {out}" + ("" if ns.out else " (--out DIR to choose, --no-save for none)") if out else
        "saving nothing (--no-save)")
    try:
        # with --json, stdout carries only the result: log lines go to stderr
        log = (lambda line: print(line, file=sys.stderr, flush=True)) if ns.json else None
        with denormals_flushed(run.backend):
            records = training.fit(run, writer, log=log, progress=not ns.quiet)
    except KeyboardInterrupt as e:
        say(f"rnnlab: interrupted at {run.where()}; {_saved(run, out, e)}")
        return 130
    final = records[-1] if records else {}
    if not world.main:
        return 0
    if ns.json:
        print(dumps_json({"out": str(out) if out else None, **final}))
    elif final:
        num = training.num
        print(f"perplexity {num(final['train_ppl'], '.3f')} (train), {num(final['val_ppl'], '.2f')} (held-out, "
              f"{num(final['val_bits_per_token'], '.3f')} bits/token), {final['tokens_per_s']:,.0f} "
              f"training tokens/s on {run.backend.name}")
        for sample in final["samples"].values():
            print(sample)
        if out:
            print(f"saved in {out}: rnnlab generate --checkpoint {out}", file=sys.stderr)
    return 0


def _saved(run, out, interrupt: KeyboardInterrupt) -> str:
    """What an interrupted run leaves on disk, truthfully."""
    from .train import Interrupted, saved_where
    if not out:
        return "nothing is saved with --no-save"
    if isinstance(interrupt, Interrupted) and interrupt.saved:
        return f"saved that step in {out} (continue with --resume)"
    if run.writer is not None and run.writer.old_run:
        return f"nothing of this run was saved; {out} still holds the run it was to replace"
    where = saved_where(run.writer)
    if where is None:
        return f"nothing was saved in {out}"
    return f"the checkpoint in {out} is at {where} (continue with --resume)"


def cmd_generate(ns) -> int:
    from . import limits
    from .lm import LM
    g = GenerateConfig(**given(ns, GenerateConfig))
    g.validate()
    if ns.stream and ns.json:
        raise RnnlabError("--stream prints the text as it is made and --json all of it at the end: give one")
    check_device(ns.device, ns.backend)
    set_threads(ns.threads, ns.backend, ns.device)
    model = LM.load(ns.checkpoint, ns.backend, ns.device)
    g = model.options(g)
    prompts = [model.prompt(raw) for raw in ((g.prefix,) if g.prefix is not None else model.prompts)]
    limits.check_generate(len(model.vocab), model.model_cfg, max(g.num_samples, g.beam), g.num_preds,
                          max(len(p.ids) for p in prompts))
    for note in _generate_notes(model, prompts, g):
        print(f"rnnlab generate: note: {note}", file=sys.stderr)
    many = len(prompts) * g.num_samples > 1
    results = []
    for p in prompts:
        if ns.stream:
            texts = _stream(model, p, g, many)
        else:
            texts = model.generate(p, g)
            if not ns.json:
                for i, t in enumerate(texts):
                    print(f"{_header(p, i, g.num_samples)}\n{t}\n" if many else t)
        results.append({"prompt": p.text, "samples": texts})
    if ns.json:
        print(dumps_json({"prefix": g.prefix, "prompts": results, "temperature": g.temperature, "top_k": g.top_k,
                          "top_p": g.top_p, "beam": g.beam, "seed": g.seed,
                          "samples": [t for r in results for t in r["samples"]]}))
    return 0


def _header(prompt, i: int, n: int) -> str:
    return f"--- {prompt.text!r}, sample {i + 1} of {n} ---"


def _stream(model, prompt, g, many: bool) -> list[str]:
    """Print the first continuation as it is made and the others after it; return all of them."""
    parts = [[prompt.text] for _ in range(g.num_samples)]
    print((_header(prompt, 0, g.num_samples) + "\n" if many else "") + prompt.text, end="", flush=True)
    for piece in model.stream(prompt, g):
        parts[piece.sample].append(piece.text)
        if piece.sample == 0:
            print(piece.text, end="", flush=True)
    print("\n" if many else "")
    texts = ["".join(p) for p in parts]
    for i, t in enumerate(texts[1:], start=1):
        print(f"{_header(prompt, i, g.num_samples)}\n{t}\n")
    return texts


def _generate_notes(model, prompts, g) -> list[str]:
    """What the user should know: prompt characters the vocabulary lacks, stop texts that can never appear."""
    notes = []
    for p in prompts:
        if p.unknown:
            shown = ", ".join(f"{c!r} x{n}" for c, n in list(p.unknown.items())[:5])
            notes.append(f"the prompt {p.text!r} has characters the model's vocabulary lacks ({shown}); the model "
                         "reads them as <unk>, an unknown character")
    never = model.unreachable(g.stop)
    if never:
        notes.append(f"the model can never write the stop text(s) {', '.join(map(repr, never))}: its vocabulary "
                     "lacks a character of them")
    return notes


def cmd_eval(ns) -> int:
    from . import evaluate
    from .checkpoint import load_model
    from .runstate import load_dataset
    if ns.mix_ngram < 0 or not 0.0 <= ns.mix_weight <= 1.0:
        raise RnnlabError(f"--mix-ngram takes an n-gram order >= 1 and --mix-weight a weight in [0, 1], got "
                          f"{ns.mix_ngram} and {ns.mix_weight}")
    if ns.dynamic_rule != "sgd" and not ns.dynamic_lr:
        raise RnnlabError(f"--dynamic-rule {ns.dynamic_rule} is a rule of dynamic evaluation: give --dynamic-lr too")
    how = _eval_config(ns)
    check_device(ns.device, ns.backend)
    set_threads(ns.threads, ns.backend, ns.device)
    m = load_model(ns.checkpoint, ns.backend, ns.device, how.matmul_dtype)
    scoring = {"pieces": how.eval_batch, "warmup": how.eval_warmup, "max_tokens": how.val_max_tokens}
    rms = bool(ns.dynamic_lr) and ns.dynamic_rule == "rms"
    needs_own = bool(ns.mix_ngram or rms)            # the model's own training split, whatever --corpus says
    own = None if ns.corpus and not needs_own else _own_data(ns, m)
    tokens, path = _eval_tokens(ns, m, own)
    own_train = load_dataset(own, m.vocab).train if needs_own else None
    extra = {"dynamic": None, "mixture": None}
    kn = None
    if ns.mix_ngram:
        from . import ngram
        kn = ngram.KneserNey(ns.mix_ngram, len(m.vocab)).fit(own_train)
    if ns.dynamic_lr:
        ms = evaluate.gradient_ms(m.backend, own_train, ns.dynamic_steps) if rms else None
        result = evaluate.score_stream_dynamic(m.backend, tokens, ns.dynamic_lr, ns.dynamic_steps,
                                               ns.dynamic_decay, ngram_model=kn, weight=ns.mix_weight, ms=ms)
        extra["dynamic"] = {"lr": ns.dynamic_lr, "num_steps": ns.dynamic_steps, "decay": ns.dynamic_decay,
                            "rule": ns.dynamic_rule}
    elif kn is not None:
        result = evaluate.score_mixture(m.backend, tokens, kn, ns.mix_weight, **scoring)
    else:
        result = evaluate.score_stream(m.backend, tokens, **scoring)
    if kn is not None:
        extra["mixture"] = {"ngram_order": ns.mix_ngram, "model_weight": ns.mix_weight,
                            "model_perplexity": result.pop("model_perplexity"),
                            "ngram_perplexity": result.pop("ngram_perplexity")}
    unknown = int((tokens == m.vocab.unk).sum())
    bpc = result["bits_per_token"] if m.data_cfg.token == "char" else None
    report = {"corpus": str(path), "split": ns.split, **result, "bits_per_char": bpc, "unknown_tokens": unknown,
              "checkpoint_epoch": m.checkpoint.epoch, **extra}
    print(dumps_json(report) if ns.json else _eval_summary(report, m.data_cfg.token))
    return 0


def _eval_config(ns) -> EvalConfig:
    """How `eval` scores (--eval-batch, --eval-warmup, --val-max-tokens, --matmul-dtype), checked."""
    how = EvalConfig(**given(ns, EvalConfig))
    how.validate()
    if ns.dynamic_lr and (how.eval_batch > 1 or how.val_max_tokens):
        raise RnnlabError("dynamic evaluation reads the whole text as one stream: it takes neither --eval-batch "
                          "above 1 nor --val-max-tokens")
    return how


SPLIT_NAMES = {"val": "held-out", "train": "training-split", "all": "whole-text"}


def _per(token: str) -> tuple[str, str]:
    """('character', 'char') or ('token', 'token'): what a figure is counted in."""
    return ("character", "char") if token == "char" else ("token", "token")


def _eval_summary(r: dict, token: str) -> str:
    """`held-out perplexity 5.43, 2.441 bits/char over 17,599 characters of timemachine.txt (epoch 2)`, then a
    line on a mixture, dynamic evaluation or unknown tokens where there is one."""
    from .train import num
    unit, per = _per(token)
    how = (" of the mixture" if r["mixture"] else "") + (" with dynamic evaluation" if r["dynamic"] else "")
    lines = [(f"{SPLIT_NAMES[r['split']]} perplexity {num(r['perplexity'], '.2f')}{how}, "
              f"{num(r['bits_per_token'], '.3f')} bits/{per} over {r['tokens']:,} {unit}s of "
              f"{Path(r['corpus']).name} (epoch {r['checkpoint_epoch']})")]
    lines += [line for line in [_scoring_line(r["scoring"], r["tokens"], unit)] if line]
    if r["mixture"]:
        mix = r["mixture"]
        lines.append(f"mixture: {mix['model_weight']:g} x the model (perplexity {num(mix['model_perplexity'], '.2f')} "
                     f"alone) + {1 - mix['model_weight']:g} x a {mix['ngram_order']}-gram Kneser-Ney fitted on its "
                     f"training split ({num(mix['ngram_perplexity'], '.2f')} alone)")
    if r["dynamic"]:
        dyn = r["dynamic"]
        rule = "SGD" if dyn["rule"] == "sgd" else "RMS-scaled"
        lines.append(f"dynamic evaluation: one {rule} step of lr {dyn['lr']:g} after each {dyn['num_steps']}-{per} "
                     f"segment, decay {dyn['decay']:g}; the model adapts as it reads, so this is not a static figure")
    if r["unknown_tokens"]:
        n = r["unknown_tokens"]
        lines.append(f"{n:,} {unit}{'' if n == 1 else 's'} the vocabulary lacks {'was' if n == 1 else 'were'} "
                     "scored as <unk>")
    return "\n".join(lines)


def _scoring_line(how: dict, tokens: int, unit: str) -> str | None:
    """How a figure was scored, when not as one exact stream of the whole text (`evaluate.scoring`)."""
    parts = []
    if how["pieces"] > 1:
        parts.append(f"as {how['pieces']} pieces side by side, each after the first warmed up on the "
                     f"{how['warmup']:,} {unit}s before it (--eval-batch 1: one exact stream)")
    if tokens < how["stream_tokens"]:
        parts.append(f"{tokens:,} of {how['stream_tokens']:,} {unit}s (--val-max-tokens)")
    if how["matmul_dtype"] == "bfloat16":
        parts.append("with bf16 matmuls")
    return "scored " + ", ".join(parts) if parts else None


def _own_data(ns, m) -> DataConfig:
    """The data settings of the model in --checkpoint, with its corpus found wherever it is now (by its SHA-256)
    and --data-dir applied."""
    from .prepared import of_checkpoint
    from .runstate import run_corpus
    data_dir = ns.data_dir or m.data_cfg.data_dir
    return dataclasses.replace(m.data_cfg, data_dir=data_dir, corpus=run_corpus(m.checkpoint, ns.checkpoint, data_dir),
                               prepared=of_checkpoint(m.checkpoint, ns.checkpoint))


def _eval_tokens(ns, m, own: DataConfig | None):
    """(tokens, file) that `eval` scores: the --split of the model's own corpus `own`, or of --corpus. "train" is
    what the model trained on (--max-tokens applies); "all" is the whole text, encoded without splitting it, so
    a text too short to hold anything out is scored too."""
    from .runstate import encode, load_dataset
    data_cfg = own
    if ns.corpus:
        data_cfg = dataclasses.replace(m.data_cfg, corpus=ns.corpus, data_dir=ns.data_dir or m.data_cfg.data_dir,
                                       prepared=None)
    if ns.corpus or ns.split != "train":      # another text, or the held-out text alone: no extra text is read
        data_cfg = dataclasses.replace(data_cfg, extra_text=())
    if ns.split == "all":
        tokens, _, path, _, _ = encode(data_cfg, m.vocab)
        return tokens, path
    max_tokens = data_cfg.max_tokens if ns.split == "train" else -1
    ds = load_dataset(dataclasses.replace(data_cfg, max_tokens=max_tokens), m.vocab)
    return (ds.val if ns.split == "val" else ds.train), ds.path


def cmd_baseline(ns) -> int:
    from . import ngram
    from .prepared import of_checkpoint, settings
    from .runstate import load_dataset, run_corpus
    if ns.checkpoint:
        from . import checkpoint
        ckpt = checkpoint.load(ns.checkpoint)
        data_cfg, _, _, vocab = checkpoint.read_configs(ckpt, ns.checkpoint)
        data_cfg = dataclasses.replace(data_cfg, **given(ns, DataConfig))
        if "corpus" not in given(ns, DataConfig):
            data_cfg = dataclasses.replace(data_cfg, corpus=run_corpus(ckpt, ns.checkpoint, data_cfg.data_dir),
                                           prepared=of_checkpoint(ckpt, ns.checkpoint, data_cfg.prepared))
        else:                                          # another text: the model's extra text is not its own
            data_cfg = dataclasses.replace(data_cfg, prepared=None,
                                           extra_text=given(ns, DataConfig).get("extra_text", ()))
    else:
        data = given(ns, DataConfig)
        data_cfg, vocab = DataConfig(**(settings(data) if "prepared" in data else data)), None
    validate_sizes(data_cfg, ModelConfig(), TrainConfig())
    ds = load_dataset(data_cfg, vocab)
    for order in ns.order:
        result = ngram.KneserNey(order, len(ds.vocab)).fit(ds.train).score(ds.val)
        bpc = result["bits_per_token"] if data_cfg.token == "char" else None
        report = {"model": f"{order}-gram Kneser-Ney", "order": order, "corpus": str(ds.path),
                  "train_tokens": len(ds.train), **result, "bits_per_char": bpc}
        print(dumps_json(report) if ns.json else _baseline_line(report, data_cfg.token))
    return 0


def _baseline_line(r: dict, token: str) -> str:
    """`5-gram Kneser-Ney: held-out perplexity 4.09, 2.032 bits/char over 17,342 characters of timemachine.txt
    (fitted on 155,000)`."""
    from .train import num
    unit, per = _per(token)
    return (f"{r['model']}: held-out perplexity {num(r['perplexity'], '.2f')}, {num(r['bits_per_token'], '.3f')} "
            f"bits/{per} over {r['tokens']:,} {unit}s of {Path(r['corpus']).name} (fitted on {r['train_tokens']:,})")


def cmd_score(ns) -> int:
    from . import scorepage
    from .fileio import atomic_write_text
    from .lm import LM
    raw, source = _score_text(ns)
    if ns.max_chars < 1:
        raise RnnlabError(f"--max-chars must be >= 1, got {ns.max_chars}")
    if len(raw) > ns.max_chars:
        raise RnnlabError(f"{source} has {len(raw):,} characters, more than --max-chars {ns.max_chars:,}: scoring "
                          "takes one model step per character (about 5-20K a second on a CPU); raise --max-chars "
                          "to score all of it, or score a part")
    if ns.html:
        _check_writable(ns.html, "--html")
    check_device(ns.device, ns.backend)
    set_threads(ns.threads, ns.backend, ns.device)
    model = LM.load(ns.checkpoint, ns.backend, ns.device)
    if not 0 <= ns.top <= len(model.vocab):
        raise RnnlabError(f"--top must be between 0 and {len(model.vocab)}, the vocabulary's size, got {ns.top}")
    scored = model.score(raw, ns.top)
    about = {"source": source, "checkpoint": str(ns.checkpoint), "epoch": model.checkpoint.epoch}
    if scored.unknown:
        print(f"rnnlab score: note: {scorepage.unknown_line(scored)}", file=sys.stderr)
    if ns.html:
        atomic_write_text(ns.html, scorepage.html_page(scored, **about))
        print(f"rnnlab score: wrote {ns.html}", file=sys.stderr)
    if ns.json:
        print(dumps_json(scorepage.document(scored, **about)))
    else:
        print(scorepage.tsv(scored) if ns.tsv else scorepage.summary_text(scored, **about))
    return 0


def _score_text(ns) -> tuple[str, str]:
    """(text, where it came from): --text, FILE read as UTF-8, or stdin for '-'."""
    from .corpora import read_text
    if (ns.file is None) == (ns.text is None):
        raise RnnlabError("give the text to score as a FILE ('-' for stdin) or as --text TEXT" if ns.file is None
                          else "give the text to score as a FILE or as --text, not both")
    if ns.text is not None:
        if not ns.text:
            raise RnnlabError("--text is empty: give at least 2 characters to score")
        return ns.text, "the text given"
    if ns.file != "-":
        return read_text(Path(ns.file)), Path(ns.file).name
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise RnnlabError(f"stdin is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
    if not text:
        raise RnnlabError("stdin is empty: give at least 2 characters to score")
    return text, "stdin"


def _check_writable(path: str, flag: str) -> None:
    """Refuse, before any work, a file that cannot be written: no such directory, or a directory itself."""
    p = Path(path)
    if not path.strip() or p.is_dir():
        raise RnnlabError(f"{flag} {path!r} is a directory, not a file" if path.strip() else f"{flag} is empty")
    if not p.parent.is_dir():
        raise RnnlabError(f"{flag} {path}: the directory {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise RnnlabError(f"{flag} {path}: the directory {p.parent} is not writable")


def cmd_sweep(ns) -> int:
    from .sweep import sweep
    if not ns.out.strip():
        raise RnnlabError("--out is empty; give the directory for the sweep's runs")
    if not ns.budget > 0:
        raise RnnlabError(f"--budget must be positive, got {ns.budget}")
    data = DataConfig(**given(ns, DataConfig))
    model, train_cfg = ModelConfig(**given(ns, ModelConfig)), TrainConfig(**given(ns, TrainConfig))
    validate_sizes(data, model, train_cfg)
    check_device(train_cfg.device, train_cfg.backend)
    sweep(data, model, train_cfg, ns.out, ns.budget, tuple(ns.variants), overwrite=ns.overwrite)
    print(Path(ns.out) / "sweep.md")
    return 0


def cmd_bench(ns) -> int:
    from . import bench
    if ns.repeats <= 0 or ns.warmup < 0:
        raise RnnlabError("--repeats must be positive and --warmup >= 0")
    check_device(ns.device)
    result = bench.run(tuple(ns.configs), ns.device, ns.repeats, ns.warmup, sections=tuple(ns.sections),
                       data_dir=ns.data_dir, quick=ns.quick, compile=not ns.no_compile)
    print(dumps_json(result, indent=1) if ns.json else bench.format_report(result))
    return 0


def cmd_prepare(ns) -> int:
    from . import prepare
    if not ns.out.strip():
        raise RnnlabError("--out is empty; give the directory for the prepared text")
    show = None if ns.quiet or not sys.stderr.isatty() else _show_progress
    meta = prepare.prepare(ns.text, ns.out, ns.preprocess, ns.token, ns.val_fraction, ns.overwrite, progress=show)
    if show:
        print(file=sys.stderr)
    n, size = meta["num_tokens"], meta["source"]["bytes"]
    summary = {"out": str(ns.out), "source": meta["source"]["path"], "bytes": size, "tokens": n,
               "train_tokens": n - meta["num_val"], "val_tokens": meta["num_val"],
               "vocab_size": len(meta["vocab"]["idx_to_token"]), "dtype": meta["dtype"],
               "preprocess": meta["preprocess"], "token": meta["token"], "seconds": meta["seconds"],
               "mb_per_s": size / 1e6 / max(meta["seconds"], 1e-9)}
    print(dumps_json(summary) if ns.json else _prepare_summary(summary))
    return 0


def _show_progress(stage: str, done: int, total: int) -> None:
    print(f"\r{stage} {done / 1e6:,.0f} of {total / 1e6:,.0f} MB ({done / max(total, 1):.0%})  ", end="",
          file=sys.stderr, flush=True)


def _prepare_summary(r: dict) -> str:
    """`prepared tinyshakespeare.txt in ts: 1,115,394 tokens (1,003,855 training, 111,539 held out), vocabulary
    66 (uint8), unicode chars; 1.1 MB in 0.05 s (22.3 MB/s)`, then the command that trains on it."""
    unit = "chars" if r["token"] == "char" else "words"
    return (f"prepared {Path(r['source']).name} in {r['out']}: {r['tokens']:,} tokens ({r['train_tokens']:,} "
            f"training, {r['val_tokens']:,} held out), vocabulary {r['vocab_size']:,} ({r['dtype']}), "
            f"{r['preprocess']} {unit}; {r['bytes'] / 1e6:,.1f} MB in {r['seconds']:.2f} s ({r['mb_per_s']:,.1f} "
            f"MB/s)\ntrain on it: rnnlab train --data {r['out']}")


def cmd_corpora(ns) -> int:
    from . import corpora
    rows = corpora.status(ns.data_dir)
    if ns.json:
        print(dumps_json(rows, indent=1))
        return 0
    for r in rows:
        where = r["path"] or "not found (downloaded on first use)"
        ok = "sha256 ok" if r["sha256_ok"] else ("SHA-256 MISMATCH" if r["path"] else "")
        print(f"{r['name']:<18} {where}  {ok}")
    return 0


def cmd_serve(ns) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise RnnlabError(f"the server needs {e.name or 'fastapi and uvicorn'}, which is not installed: "
                          "pip install 'rnnlab[serve]'") from None
    from .lm import LM
    from .serve import Limits
    from .serve.app import create_app, listen, run, url_of
    limits = Limits(**given(ns, Limits))
    limits.validate()
    check_device(ns.device, ns.backend)
    set_threads(ns.threads, ns.backend, ns.device)
    model = LM.load(ns.checkpoint, ns.backend, ns.device)
    app = create_app(model, limits)
    sock = listen(ns.host, ns.port)
    m = model.model_cfg
    print(f"rnnlab serve: {m.cell} {m.num_layers}x{m.num_hiddens} from {ns.checkpoint} on {url_of(sock)} "
          "(Ctrl-C stops)", flush=True)
    run(app, sock, ns.log_level)
    return 0


def os_error_line(e: OSError) -> str:
    """A file error as one line: the file, then what went wrong."""
    name = e.filename2 or e.filename          # a failed rename names its target second
    return f"{name}: {e.strerror or e}" if name else str(e.strerror or e)


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "corpora": cmd_corpora,
            "score": cmd_score, "bench": cmd_bench, "baseline": cmd_baseline, "sweep": cmd_sweep,
            "serve": cmd_serve, "prepare": cmd_prepare}


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return COMMANDS[ns.command](ns)
    except RnnlabError as e:
        print(f"rnnlab {ns.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:   # the reader of stdout went away (`rnnlab score --tsv | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())     # nothing more to flush at exit
        return 141                                                          # as a process SIGPIPE ends
    except OSError as e:      # a file rnnlab could not write or read: the disk, permissions, a bad path
        print(f"rnnlab {ns.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rnnlab: interrupted", file=sys.stderr)
        return 130

"""Command-line interface: `rnnlab train | generate | eval | corpora`.

Flags are generated from the config dataclasses (one flag per field, its help and default shown in --help).
Entry points are thin: parse, build configs, call the library, print. `main(argv)` returns the exit code.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import typing
from pathlib import Path

from . import __version__, presets
from .backends import check_device, device_of, resolve_device
from .config import DataConfig, GenerateConfig, ModelConfig, TrainConfig, validate_sizes
from .errors import RnnlabError
from .fileio import dumps_json
from .sweep import VARIANTS

INT64_MAX = 2 ** 63 - 1
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
                  "help": f"{f.metadata['help']} (default: {_show(f.default)})"}
        hint = hints[f.name]
        if typing.get_origin(hint) is tuple:
            kwargs.update(nargs="+", type=str, metavar="TEXT")
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rnnlab", description="Character-level recurrent language models: the d2l §8.5 "
                     "RNN, reproduced exactly, with honest held-out evaluation.")
    parser.add_argument("--version", action="version", version=f"rnnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model (defaults: the book's run on The Time Machine)")
    train.add_argument("--out", metavar="DIR", help="run directory: metrics.jsonl, checkpoint, plot "
                       "(default: none, nothing is saved)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out up to --num-epochs (default: off)")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out (default: off)")
    train.add_argument("--json", action="store_true", help="print the final metrics as JSON (default: off)")
    train.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    train.add_argument("--preset", choices=tuple(presets.PRESETS),
                       help="start from named settings (book: the §8.5 run; legacy: the early notebook's run; "
                            "timemachine, shakespeare: the best measured for that corpus); flags given override "
                            "them (default: none, i.e. the book's)")
    for cls in (DataConfig, ModelConfig, TrainConfig):
        add_config_args(train, cls)

    gen = sub.add_parser("generate", help="continue a prefix with a trained model")
    gen.add_argument("--checkpoint", metavar="DIR", required=True, help="run directory of `rnnlab train`")
    add_config_args(gen, GenerateConfig)
    gen.add_argument("--num-samples", type=int64, default=1, metavar="N",
                     help="continuations decoded at once (default: 1)")
    _add_backend_args(gen)
    gen.add_argument("--json", action="store_true", help="print the result as JSON")

    ev = sub.add_parser("eval", help="score held-out text (prints JSON)")
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
    ev.add_argument("--mix-ngram", type=int64, default=0, metavar="ORDER",
                    help="score the mixture of the model with a Kneser-Ney n-gram of this order fitted on the "
                         "model's own training split (default: 0, the model alone)")
    ev.add_argument("--mix-weight", type=finite_float, default=0.5, metavar="W",
                    help="weight of the model in the mixture; the n-gram gets 1 - W (default: 0.5)")
    _add_backend_args(ev)

    base = sub.add_parser("baseline", help="interpolated Kneser-Ney n-gram on the same split (prints JSON)")
    base.add_argument("--order", type=int64, nargs="+", default=[5], metavar="N",
                      help="n-gram order(s); several give one line each (default: 5)")
    base.add_argument("--checkpoint", metavar="DIR",
                      help="take the corpus, preprocessing and split from this run (default: the flags below)")
    add_config_args(base, DataConfig)

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
    bench.add_argument("--configs", nargs="+", default=["book", "big", "word"], choices=["book", "big", "word"],
                       help="book: B=32 H=512 chars; big: B=128 H=1024; word: word level, V=4,580 "
                            "(default: all three)")
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

    corp = sub.add_parser("corpora", help="named corpora: where they were found and whether the hash is right")
    corp.add_argument("--data-dir", help="directory searched first")
    corp.add_argument("--json", action="store_true", help="print as JSON")
    return parser


def cmd_train(ns) -> int:
    from . import train as training
    if ns.out is not None and not ns.out.strip():
        raise RnnlabError("--out is empty; give the run directory (or leave --out out: nothing is saved)")
    data, model, train_cfg = given(ns, DataConfig), given(ns, ModelConfig), given(ns, TrainConfig)
    if ns.preset:
        data, model, train_cfg = presets.apply(ns.preset, data, model, train_cfg)
    check_device(train_cfg.get("device", "auto"), train_cfg.get("backend", "auto"))
    if ns.resume:
        if not ns.out or ns.overwrite:
            raise RnnlabError("--resume needs --out DIR, the run to continue (and no --overwrite)")
        run = training.resume_run(ns.out, data, model, train_cfg)
    else:
        run = training.new_run(DataConfig(**data), ModelConfig(**model), TrainConfig(**train_cfg))
    writer = training.open_writer(run, ns.out, ns.overwrite) if ns.out else None   # fails before training
    for note in run.notes:
        print(f"rnnlab train: note: {note}", file=sys.stderr)
    if ns.resume and run.epoch >= run.train_cfg.num_epochs:
        print(f"{ns.out} is already at epoch {run.epoch}; nothing to train (raise --num-epochs)", file=sys.stderr)
    elif ns.resume:
        print(f"resuming {ns.out} at epoch {run.epoch} of {run.train_cfg.num_epochs}", file=sys.stderr)
    d, c = run.dataset, run.train_cfg
    print(f"corpus {d.path.name}: {len(d.train):,} training / {len(d.val):,} held-out tokens, "
          f"vocab {len(d.vocab)}; backend {run.backend.name}, {c.dtype}, device {device_of(run.backend)}",
          file=sys.stderr)
    try:
        # with --json, stdout carries only the result: log lines go to stderr
        log = (lambda line: print(line, file=sys.stderr, flush=True)) if ns.json else None
        records = training.fit(run, writer, log=log, progress=not ns.quiet)
    except KeyboardInterrupt:
        print(f"rnnlab: interrupted after {run.epoch} completed epochs; {_saved(run, ns.out)}", file=sys.stderr)
        return 130
    finally:
        if writer is not None:
            writer.close()
    final = records[-1] if records else {}
    if ns.json:
        print(dumps_json({"out": ns.out, **final}))
    elif final:
        num = training.num
        print(f"perplexity {num(final['train_ppl'], '.3f')} (train), {num(final['val_ppl'], '.2f')} (held-out, "
              f"{num(final['val_bits_per_token'], '.3f')} bits/token), {final['tokens_per_s']:,.0f} "
              f"training tokens/s on {run.backend.name}")
        for sample in final["samples"].values():
            print(sample)
    return 0


def _saved(run, out) -> str:
    """What an interrupted run leaves on disk, truthfully."""
    if not out:
        return "nothing is saved without --out"
    if run.writer is not None and run.writer.old_run:
        return f"nothing of this run was saved; {out} still holds the run it was to replace"
    if run.saved_epoch is None or run.out is None:
        every = run.train_cfg.log_every
        return f"nothing was saved in {out} (the first checkpoint is written at epoch {every})"
    return f"the checkpoint in {out} is at epoch {run.saved_epoch} (continue with --resume)"


def cmd_generate(ns) -> int:
    import numpy as np

    from . import generate, limits, text
    from .checkpoint import load_model
    g = GenerateConfig(**given(ns, GenerateConfig))
    g.validate()
    if ns.num_samples <= 0:
        raise RnnlabError(f"--num-samples must be positive, got {ns.num_samples}")
    check_device(ns.device, ns.backend)
    # decoding one token at a time is latency-bound: on the CPU, numpy's small calls beat torch's
    backend = "numpy" if ns.backend == "auto" and resolve_device(ns.device) == "cpu" else ns.backend
    m = load_model(ns.checkpoint, backend, ns.device)
    tokens = text.tokenize(text.normalize_prefix(g.prefix, m.data_cfg.preprocess), m.data_cfg.token)
    if len(tokens) == 0:
        raise RnnlabError("the prefix is empty: give at least one character to warm up on")
    limits.check_generate(len(m.vocab), m.model_cfg, ns.num_samples, g.num_preds, len(tokens))
    joiner = "" if m.data_cfg.token == "char" else " "
    outs = generate.predict(m.backend, m.vocab, tokens, g.num_preds, g.temperature,
                            np.random.default_rng(g.seed), ns.num_samples, joiner)
    if ns.json:
        print(dumps_json({"prefix": g.prefix, "temperature": g.temperature, "seed": g.seed, "samples": outs}))
    else:
        print("\n".join(outs))
    return 0


def cmd_eval(ns) -> int:
    from . import evaluate
    from .checkpoint import load_model
    from .train import load_dataset
    if ns.dynamic_lr and ns.mix_ngram:
        raise RnnlabError("--dynamic-lr and --mix-ngram are separate evaluations; give one of them")
    if ns.mix_ngram < 0 or not 0.0 <= ns.mix_weight <= 1.0:
        raise RnnlabError(f"--mix-ngram takes an n-gram order >= 1 and --mix-weight a weight in [0, 1], got "
                          f"{ns.mix_ngram} and {ns.mix_weight}")
    check_device(ns.device, ns.backend)
    m = load_model(ns.checkpoint, ns.backend, ns.device)
    # "train" is what the model trained on (--max-tokens applies); "all" is the whole text
    max_tokens = m.data_cfg.max_tokens if ns.split == "train" else -1
    data_cfg = dataclasses.replace(m.data_cfg, max_tokens=max_tokens, corpus=ns.corpus or m.data_cfg.corpus,
                                   data_dir=ns.data_dir or m.data_cfg.data_dir)
    ds = load_dataset(data_cfg, m.vocab)
    if ns.split == "all":
        import numpy as np
        tokens = np.concatenate([ds.train, ds.val])
    else:
        tokens = ds.val if ns.split == "val" else ds.train
    extra = {"dynamic": None, "mixture": None}
    if ns.dynamic_lr:
        result = evaluate.score_stream_dynamic(m.backend, tokens, ns.dynamic_lr, ns.dynamic_steps,
                                               ns.dynamic_decay)
        extra["dynamic"] = {"lr": ns.dynamic_lr, "num_steps": ns.dynamic_steps, "decay": ns.dynamic_decay}
    elif ns.mix_ngram:
        from . import ngram
        own_train = load_dataset(m.data_cfg, m.vocab).train          # what the model itself trained on
        kn = ngram.KneserNey(ns.mix_ngram, len(m.vocab)).fit(own_train)
        result = evaluate.score_mixture(m.backend, tokens, kn, ns.mix_weight)
        extra["mixture"] = {"ngram_order": ns.mix_ngram, "model_weight": ns.mix_weight,
                            "model_perplexity": result.pop("model_perplexity"),
                            "ngram_perplexity": result.pop("ngram_perplexity")}
    else:
        result = evaluate.score_stream(m.backend, tokens)
    unknown = int((tokens == m.vocab.unk).sum())
    bpc = result["bits_per_token"] if m.data_cfg.token == "char" else None
    print(dumps_json({"corpus": str(ds.path), "split": ns.split, **result, "bits_per_char": bpc,
                      "unknown_tokens": unknown, "checkpoint_epoch": m.checkpoint.epoch, **extra}))
    return 0


def cmd_baseline(ns) -> int:
    from . import ngram
    from .train import load_dataset
    if ns.checkpoint:
        from . import checkpoint
        ckpt = checkpoint.load(ns.checkpoint)
        data_cfg, _, _, vocab = checkpoint.read_configs(ckpt, ns.checkpoint)
        data_cfg = dataclasses.replace(data_cfg, **given(ns, DataConfig))
    else:
        data_cfg, vocab = DataConfig(**given(ns, DataConfig)), None
    validate_sizes(data_cfg, ModelConfig(), TrainConfig())
    ds = load_dataset(data_cfg, vocab)
    for order in ns.order:
        result = ngram.KneserNey(order, len(ds.vocab)).fit(ds.train).score(ds.val)
        bpc = result["bits_per_token"] if data_cfg.token == "char" else None
        print(dumps_json({"model": f"{order}-gram Kneser-Ney", "order": order, "corpus": str(ds.path),
                          "train_tokens": len(ds.train), **result, "bits_per_char": bpc}))
    return 0


def cmd_sweep(ns) -> int:
    from .sweep import sweep
    if not ns.out.strip():
        raise RnnlabError("--out is empty; give the directory for the sweep's runs")
    if not ns.budget > 0:
        raise RnnlabError(f"--budget must be positive, got {ns.budget}")
    data = DataConfig(**given(ns, DataConfig))
    model, train_cfg = ModelConfig(**given(ns, ModelConfig)), TrainConfig(**given(ns, TrainConfig))
    validate_sizes(data, model, train_cfg)
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


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "corpora": cmd_corpora,
            "bench": cmd_bench, "baseline": cmd_baseline, "sweep": cmd_sweep}


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return COMMANDS[ns.command](ns)
    except RnnlabError as e:
        print(f"rnnlab {ns.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:      # a file rnnlab could not write or read: the disk, permissions, a bad path
        name = e.filename2 or e.filename          # a failed rename names its target second
        where = f"{name}: " if name else ""
        print(f"rnnlab {ns.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rnnlab: interrupted", file=sys.stderr)
        return 130

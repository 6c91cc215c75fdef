"""Typed, frozen configuration. The defaults are the book's §8.5 run.

Every field carries a one-line help text (and, where it applies, its choices); the CLI is generated from
these dataclasses, so a field added here appears as a flag with its default in `--help`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import RnnlabError


def option(default: Any, help: str, choices: tuple | None = None, flag: str | None = None,
           metavar: str | None = None, shown: str | None = None):
    """A dataclass field with the metadata the CLI needs: help text, choices, and where they differ from
    the defaults, a flag name (the field's name stays an alias), a metavar, and the default in words (for a
    default decided later, such as None for "the run's own prompts")."""
    meta = {"help": help, "choices": choices, "flag": flag, "metavar": metavar, "shown": shown}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults: configs are frozen")
    return dataclasses.field(default=default, metadata=meta)


EVAL_BATCH_HELP = ("held-out scoring: 1 = one stream, batch 1, exact; K = K contiguous pieces of the stream "
                   "scored side by side as one batch, each after a warm-up (--eval-warmup), faster; 0 = auto: 1 "
                   "up to 50,000 tokens, 32 above")
EVAL_WARMUP_HELP = "with --eval-batch > 1: every piece but the first first reads the W tokens before it, uncounted"


@dataclass(frozen=True)
class DataConfig:
    """Which text, how it becomes tokens, and how it is split."""

    corpus: str = option("timemachine", "corpus name (see `rnnlab corpora`) or path to a UTF-8 text file",
                         metavar="NAME|PATH")
    data_dir: str | None = option(None, "directory searched first for named corpora (then $RNNLAB_DATA, "
                                        "the cache)", metavar="DIR")
    preprocess: str = option("d2l", "d2l: the book's per-line [^A-Za-z]+ -> space, strip, lower; "
                                    "letters: the same over the whole text; raw: every character kept; legacy: "
                                    "the early notebook's lower-cased text with whitespace collapsed and its "
                                    "vocabulary over the training text; unicode: every letter, accent, digit, "
                                    "punctuation mark and case kept, NFC-normalised, control and format "
                                    "characters removed",
                             choices=("d2l", "letters", "raw", "legacy", "unicode"))
    token: str = option("char", "token type", choices=("char", "word"))
    extra_text: tuple[str, ...] = option((), "more training text: corpus names or files, preprocessed like the "
                                             "corpus and trained on before its training split; the held-out "
                                             "split stays the corpus's own, the vocabulary covers every text",
                                         metavar="NAME|PATH")
    max_tokens: int = option(10000, "train on at most the first N tokens of the corpus's training split, the "
                                    "extra text not counted (<= 0: all)")
    val_fraction: float = option(0.1, "last fraction of the encoded corpus held out, never trained on")
    prepared: str | None = option(None, "train on a text prepared by `rnnlab prepare TEXT --out DIR`, read from "
                                        "disk (its preprocess, token and val_fraction apply)", flag="data",
                                  metavar="DIR")


@dataclass(frozen=True)
class ModelConfig:
    """The network. The defaults are the book's scratch RNN: one tanh layer on one-hot input."""

    cell: str = option("rnn", "recurrent cell: the book's RNN, GRU or LSTM", choices=("rnn", "gru", "lstm"))
    cell_variant: str = option("book", "book: the chapter's cells (one bias per gate); nn: the form of torch.nn's "
                                       "RNN/GRU/LSTM and cuDNN (two biases per gate, the GRU's reset gate after "
                                       "its recurrent matmul), which --torch-impl nn runs", choices=("book", "nn"))
    num_hiddens: int = option(512, "hidden units H (per layer)")
    num_layers: int = option(1, "stacked recurrent layers")
    embed_size: int = option(0, "0: one-hot input (the book); N: a learned N-dimensional embedding")
    dropout: float = option(0.0, "dropout between layers and before the output layer (not on the "
                                 "recurrent connections) while training")
    dropout_mode: str = option("step", "step: a new dropout mask at every time step; locked: one mask per "
                                       "sequence of the minibatch, the same at every time step (variational "
                                       "dropout, AWD-LSTM's LockedDropout)", choices=("step", "locked"))
    weight_drop: float = option(0.0, "weight drop: DropConnect on the hidden-to-hidden weights W_h* while "
                                     "training, one mask per minibatch (AWD-LSTM)")
    activation: str = option("tanh", "hidden-state nonlinearity of the RNN cell", choices=("tanh", "relu"))
    init: str = option("normal", "initial weights: normal = the book's N(0, 0.01^2); uniform = "
                                 "U(-1/sqrt(H), 1/sqrt(H)) as torch.nn's recurrent layers; flax = the JAX "
                                 "port's Flax cells: lecun-normal input and output weights, orthogonal "
                                 "recurrent weights", choices=("normal", "uniform", "flax"))


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the epoch loop."""

    batch_size: int = option(32, "minibatch size B")
    num_steps: int = option(35, "time steps T per minibatch (truncated BPTT length)")
    lr: float = option(1.0, "learning rate (the peak, with a schedule)")
    theta: float = option(1.0, "clipping threshold: the global L2 norm, or each element with --clip-mode "
                               "value (0: no clipping)", flag="clip")
    clip_mode: str = option("norm", "norm: scale all gradients to global norm --clip (the book); value: clip "
                                    "each element to [-clip, clip]", choices=("norm", "value"))
    optimizer: str = option("sgd", "sgd (the book), momentum, adam or adamw",
                            choices=("sgd", "momentum", "adam", "adamw"))
    momentum: float = option(0.9, "momentum coefficient for --optimizer momentum")
    weight_decay: float = option(0.0, "weight decay of the W_* matrices: L2 added to the gradient, or "
                                      "decoupled with adamw")
    ema: float = option(0.0, "weight averaging: evaluate, keep and load the exponential moving average of the "
                             "weights, decaying by this factor per update (0: off; 0.998 averages about the last "
                             "500 updates)", metavar="DECAY")
    schedule: str = option("constant", "learning-rate schedule after warm-up: constant, step (x --lr-gamma "
                                       "every --lr-step-size epochs) or cosine (to 0 at --num-epochs)",
                           choices=("constant", "step", "cosine"))
    warmup_epochs: float = option(0.0, "epochs of linear learning-rate warm-up from 0")
    lr_step_size: int = option(10, "epochs between decays of the step schedule")
    lr_gamma: float = option(0.5, "decay factor of the step schedule")
    patience: int = option(0, "early stopping: stop after this many evaluations without a better held-out "
                              "loss (0: never); the best model is kept in OUT/best either way")
    on_divergence: str = option("stop", "when the loss or the weights stop being finite, or the loss jumps far "
                                        "above its running level: stop (the last good checkpoint is kept) or "
                                        "rollback (go back to it, halve the learning rate and continue)",
                                choices=("stop", "rollback"))
    num_epochs: int = option(500, "train up to this epoch (with --resume: continue up to it); 0: sized to the "
                                  "text, about 8M training tokens (1 to 50 epochs)")
    sampling: str = option("sequential", "minibatch sampling: sequential partitioning (streams that continue "
                                         "from one minibatch to the next), random (shuffled windows), or the "
                                         "early notebook's legacy-random and legacy-consecutive",
                           choices=("sequential", "random", "legacy-random", "legacy-consecutive"))
    state: str = option("auto", "hidden state between minibatches: carry (the previous minibatch's final state, "
                                "detached), reset (zeros before every minibatch), or auto: carry with sequential "
                                "sampling, reset with random sampling", choices=("auto", "carry", "reset"))
    seed: int = option(0, "seed for the initial weights and the data order")
    backend: str = option("auto", "auto: torch when installed, else numpy; jax needs the jax extra",
                          choices=("auto", "numpy", "torch", "jax"))
    device: str = option("auto", "device: auto (cuda when present, else cpu, like the book's try_gpu), cpu, "
                                 "cuda, cuda:N", metavar="DEVICE")
    dtype: str = option("float32", "parameter and compute dtype", choices=("float32", "float64"))
    matmul_dtype: str = option("same", "torch: dtype of matmul operands; bfloat16 keeps float32 master "
                                       "weights, states and sums", choices=("same", "bfloat16"))
    torch_impl: str = option("auto", "torch path: auto = fused for the book variant of every cell, nn for "
                                     "--cell-variant nn; fused = hand-written BPTT (RNN, GRU and LSTM stacks of "
                                     "any depth; fastest exact path); autograd = autograd over the reference "
                                     "forward; compile = that autograd step compiled by torch.compile (slow "
                                     "first step); nn = torch.nn.RNN/GRU/LSTM, cuDNN on a GPU (--cell-variant "
                                     "nn models only)", choices=("auto", "fused", "autograd", "compile", "nn"))
    log_every: int = option(10, "evaluate, log, sample and checkpoint every N epochs")
    eval_every: str = option("", "evaluate, log, sample and checkpoint every N epochs ('2', '2epochs') or every "
                                 "N minibatch steps ('500steps'), mid-epoch too (default: every --log-every "
                                 "epochs)", metavar="N[epochs|steps]")
    eval_batch: int = option(0, EVAL_BATCH_HELP, metavar="K")
    eval_warmup: int = option(256, EVAL_WARMUP_HELP, metavar="W")
    val_max_tokens: int = option(0, "score at most N held-out tokens at each evaluation while training (0: all): "
                                    "about N/K from the start of each of the K pieces (with one stream, its "
                                    "first N), the same tokens every time; the last evaluation scores the whole "
                                    "split")
    save_every: str = option("", "also checkpoint every N epochs or N steps between evaluations ('200steps'); "
                                 "a mid-epoch checkpoint resumes exactly (default: at each evaluation only)",
                             metavar="N[epochs|steps]")
    time_budget: float = option(0.0, "stop at the minibatch that takes this run's wall time (evaluation "
                                     "included) past N minutes (0: no limit); it is evaluated and saved there",
                                metavar="MINUTES")
    prefixes: tuple[str, ...] = option(("time traveller", "traveller"), "prefixes sampled greedily at each log")
    num_preds: int = option(50, "characters generated per logged sample")
    sample_every: int = option(0, "draw the logged samples every N epochs, at an evaluation (0: at every one)")
    threads: int = option(0, "torch CPU threads (0: the CPUs this process may use less the load of other "
                             "processes, at most 8)")


@dataclass(frozen=True)
class EvalConfig:
    """How `rnnlab eval` scores; the training flags of the same names score a run's evaluations alike."""

    eval_batch: int = option(0, EVAL_BATCH_HELP, metavar="K")
    eval_warmup: int = option(256, EVAL_WARMUP_HELP, metavar="W")
    val_max_tokens: int = option(0, "score at most N tokens of the split (0: all): about N/K from the start of "
                                    "each of the K pieces (with one stream, its first N)")
    matmul_dtype: str = option("same", "torch: dtype of matmul operands while scoring: same = the weights' "
                                       "(exact); bfloat16 = as a run trained with bf16 matmuls scores its "
                                       "evaluations", choices=("same", "bfloat16"))

    def validate(self) -> None:
        for flag, value in (("--eval-batch", self.eval_batch), ("--eval-warmup", self.eval_warmup),
                            ("--val-max-tokens", self.val_max_tokens)):
            _non_negative(flag, value)


@dataclass(frozen=True)
class GenerateConfig:
    """Decoding from a trained model: the prompt, how each next token is chosen, and when to stop."""

    prefix: str | None = option(None, "text the state is warmed up on", flag="prompt",
                                shown="the run's own prompts")
    num_preds: int = option(100, "tokens to generate after the prompt, at most", flag="num_chars")
    temperature: float | None = option(None, "0: greedy argmax (the book's predict_ch8); > 0: sample from "
                                             "softmax(logits / T)", shown="0 for the book's model, else 0.8")
    top_k: int = option(0, "sample from the k most likely tokens only (0: all)")
    top_p: float = option(1.0, "sample from the smallest set of most likely tokens whose probability reaches "
                               "p (nucleus sampling; 1: all)")
    beam: int = option(0, "beam search with this many beams (0: off); deterministic, so no temperature")
    length_penalty: float = option(1.0, "beam search ranks a text by its log-probability / length**X (0: none)")
    num_samples: int = option(1, "continuations of each prompt, decoded as one batch (with --beam: the best N)")
    stop: tuple[str, ...] = option((), "stop a continuation where any of these texts appears, cut before it")
    seed: int = option(0, "seed for sampling: continuation i of a seed is the same at every --num-samples")

    def validate(self) -> None:
        if self.prefix is not None and not self.prefix:
            raise RnnlabError("the prompt is empty: give at least one character to warm up on")
        if self.num_preds < 0:
            raise RnnlabError(f"--num-chars must be >= 0, got {self.num_preds}")
        if self.temperature is not None:
            _non_negative("--temperature", self.temperature)
        _non_negative("--seed", self.seed)
        _non_negative("--top-k", self.top_k)
        _non_negative("--length-penalty", self.length_penalty)
        if not 0 < self.top_p <= 1:
            raise RnnlabError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1 or self.beam < 0:
            raise RnnlabError(f"--num-samples must be >= 1 and --beam >= 0, got {self.num_samples} and "
                              f"{self.beam}")
        if any(not s for s in self.stop):
            raise RnnlabError("a stop text is empty: give at least one character")
        if self.beam:
            sampling = [flag for flag, on in (("--temperature", self.temperature), ("--top-k", self.top_k),
                                              ("--top-p", self.top_p < 1)) if on]
            if sampling:
                raise RnnlabError(f"beam search is deterministic: {', '.join(sampling)} applies to sampling; "
                                  "give --beam without it")
            if self.num_samples > self.beam:
                raise RnnlabError(f"--num-samples {self.num_samples} is more than the {self.beam} beams; give "
                                  f"--beam {self.num_samples} or more")


# Fields that define what a run computes; on --resume they must match the checkpoint. The corpus, the
# prepared directory and the extra text are not among them: the same file may be spelled another way or
# have moved, so its SHA-256 decides instead.
RUN_DEFINING = {
    "data": tuple(f.name for f in dataclasses.fields(DataConfig)
                  if f.name not in ("data_dir", "corpus", "prepared", "extra_text")),
    "model": tuple(f.name for f in dataclasses.fields(ModelConfig)),
    "train": ("batch_size", "num_steps", "theta", "clip_mode", "optimizer", "momentum", "weight_decay",
              "ema", "schedule", "warmup_epochs", "lr_step_size", "lr_gamma", "sampling", "state", "seed", "dtype",
              "eval_batch", "eval_warmup", "val_max_tokens"),      # how held-out figures compare
}


def resets_state(train: TrainConfig) -> bool:
    """Whether every minibatch starts from a zero state: `--state reset`, or `auto` with random sampling
    (whose neighbouring rows are not neighbours in the text)."""
    return train.state == "reset" or (train.state == "auto" and train.sampling in ("random", "legacy-random"))


def validate_sizes(data: DataConfig, model: ModelConfig, train: TrainConfig) -> None:
    """Raise RnnlabError with one clear line for sizes a run cannot use."""
    positive = {"--num-hiddens": model.num_hiddens, "--num-layers": model.num_layers,
                "--lr-step-size": train.lr_step_size, "--lr-gamma": train.lr_gamma,
                "--batch-size": train.batch_size,
                "--num-steps": train.num_steps,
                "--log-every": train.log_every, "--lr": train.lr}
    for flag, value in positive.items():
        if not (value > 0 and math.isfinite(value)):
            raise RnnlabError(f"{flag} must be positive, got {value}")
    _non_negative("--clip", train.theta)
    _non_negative("--embed-size", model.embed_size)
    _non_negative("--weight-decay", train.weight_decay)
    _non_negative("--warmup-epochs", train.warmup_epochs)
    _non_negative("--patience", train.patience)
    _non_negative("--time-budget", train.time_budget)
    _non_negative("--num-epochs", train.num_epochs)
    if data.extra_text and (data.prepared or data.preprocess == "legacy"):
        raise RnnlabError("--extra-text goes with a corpus read as text: not with a prepared text (--data), nor "
                          "with --preprocess legacy, whose vocabulary is its training text's")
    if not 0.0 <= model.dropout < 1.0:
        raise RnnlabError(f"--dropout must be in [0, 1), got {model.dropout}")
    if model.dropout_mode == "locked" and model.dropout == 0:
        raise RnnlabError("--dropout-mode locked sets how dropout masks are drawn: give --dropout too")
    if not 0.0 <= model.weight_drop < 1.0:
        raise RnnlabError(f"--weight-drop must be in [0, 1), got {model.weight_drop}")
    if not 0.0 <= train.ema < 1.0:
        raise RnnlabError(f"--ema must be in [0, 1), got {train.ema}")
    if not 0.0 <= train.momentum < 1.0:
        raise RnnlabError(f"--momentum must be in [0, 1), got {train.momentum}")
    if model.activation != "tanh" and model.cell != "rnn":
        raise RnnlabError(f"--activation {model.activation} applies to the rnn cell; the {model.cell} "
                          "keeps its own sigmoid and tanh")
    if train.matmul_dtype == "bfloat16" and train.dtype != "float32":
        raise RnnlabError(f"--matmul-dtype bfloat16 keeps float32 master weights; it needs --dtype float32, "
                          f"not {train.dtype}")
    every(train.eval_every, "--eval-every")
    every(train.save_every, "--save-every")
    EvalConfig(train.eval_batch, train.eval_warmup, train.val_max_tokens).validate()
    _non_negative("--num-preds", train.num_preds)
    _non_negative("--sample-every", train.sample_every)
    _non_negative("--threads", train.threads)
    _non_negative("--seed", train.seed)
    if not 0.0 < data.val_fraction < 1.0:
        raise RnnlabError(f"--val-fraction must be in (0, 1), got {data.val_fraction}")


_EVERY = re.compile(r"\s*([0-9]+)\s*(|e|ep|epoch|epochs|s|st|step|steps)\s*")


def every(spec: str, flag: str = "--eval-every") -> tuple[int, str] | None:
    """A cadence: '' -> None (the default); '10', '10epochs' -> (10, 'epoch'); '500steps' -> (500, 'step')."""
    if spec == "":
        return None
    match = _EVERY.fullmatch(spec)
    if match is None or int(match[1]) <= 0:
        raise RnnlabError(f"{flag} takes a positive count of epochs ('2', '2epochs') or of minibatch steps "
                          f"('500steps'), got {spec!r}")
    return int(match[1]), "step" if match[2].startswith("s") else "epoch"


def eval_cadence(train: TrainConfig) -> tuple[int, str]:
    """How often a run evaluates: --eval-every, or every --log-every epochs."""
    return every(train.eval_every) or (train.log_every, "epoch")


def _non_negative(flag: str, value) -> None:
    if not (value >= 0 and math.isfinite(value)):      # also refuses nan
        raise RnnlabError(f"{flag} must be a finite number >= 0, got {value}")


def to_dict(cfg) -> dict:
    """JSON-ready dict of a config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


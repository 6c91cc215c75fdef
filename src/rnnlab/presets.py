"""Named sets of settings for `rnnlab train --preset NAME`; flags given with the preset override it.

Each preset is a partial config per section (data, model, train). `book` is the §8.5 run (every default);
`legacy` is the early notebook's run (its text, vocabulary, T = 64, iterators and logging cadence; add
`--sampling legacy-consecutive` for its second run); `concise` is that notebook's concise model:
torch.nn's RNN layer (`--torch-impl nn`, the nn cell variant) with its settings, on the same text.
`text` is the defaults for a user's own text (`resolve` applies it when a corpus other than the book's is
given without a preset): every character kept, all of the text, a model that trains in minutes on a CPU, and
prompts taken from the text. The others are the best settings measured for a corpus within a fixed
training-time budget on a 2-core CPU; the README lists their measured held-out results and the commands that
reproduce them.
"""
from __future__ import annotations

from . import backends
from .errors import RnnlabError

# Wells' novels (letters): an AWD-style 2-layer LSTM, trained on the fused path with bf16 matmuls
_BOOKS_LSTM = {"cell": "lstm", "num_layers": 2, "embed_size": 64, "num_hiddens": 384, "dropout": 0.4,
               "weight_drop": 0.2, "init": "uniform"}
_BOOKS_TRAIN = {"optimizer": "adam", "lr": 0.003, "schedule": "cosine", "batch_size": 32, "num_steps": 64,
                "log_every": 4, "time_budget": 9.5, "matmul_dtype": "bfloat16"}

PRESETS: dict[str, dict[str, dict]] = {
    "book": {"data": {}, "model": {}, "train": {}},
    "legacy": {      # the early MXNet notebook (2019): its text, vocabulary, iterators and cadence
        "data": {"corpus": "timemachine", "preprocess": "legacy", "max_tokens": 10000},
        "model": {},
        "train": {"num_steps": 64, "batch_size": 32, "lr": 1.0, "theta": 1.0, "num_epochs": 500,
                  "sampling": "legacy-random", "log_every": 50, "sample_every": 100,
                  "prefixes": ("traveller", "time traveller")},
    },
    "concise": {     # the early notebook's concise model: the framework's RNN layer, its settings
        "data": {"corpus": "timemachine", "preprocess": "legacy", "max_tokens": 10000},
        "model": {"num_hiddens": 256, "cell_variant": "nn"},
        "train": {"num_steps": 35, "batch_size": 32, "lr": 100.0, "theta": 0.01, "num_epochs": 200,
                  "sampling": "legacy-consecutive", "log_every": 50, "torch_impl": "nn",
                  "prefixes": ("traveller", "time traveller")},
    },
    "timemachine": {
        "data": {"corpus": "timemachine", "preprocess": "letters", "max_tokens": 0},
        "model": _BOOKS_LSTM,
        "train": {**_BOOKS_TRAIN, "batch_size": 16, "num_epochs": 30, "ema": 0.995,
                  "prefixes": ("the time traveller",)},
    },
    "timemachine-wells": {     # The Time Machine's held-out text, with Wells' other novel as more training text
        "data": {"corpus": "timemachine", "preprocess": "letters", "max_tokens": 0,
                 "extra_text": ("war_of_the_worlds",)},
        "model": _BOOKS_LSTM,
        "train": {**_BOOKS_TRAIN, "num_epochs": 16, "ema": 0.995, "prefixes": ("the time traveller",)},
    },
    "waroftheworlds": {     # twice The Time Machine's length: fewer epochs in the same budget
        "data": {"corpus": "war_of_the_worlds", "preprocess": "letters", "max_tokens": 0},
        "model": _BOOKS_LSTM,
        "train": {**_BOOKS_TRAIN, "num_epochs": 20, "prefixes": ("the martians",)},
    },
    "shakespeare": {
        "data": {"corpus": "tinyshakespeare", "preprocess": "raw", "max_tokens": 0},
        "model": {"cell": "lstm", "num_layers": 2, "embed_size": 64, "num_hiddens": 384, "dropout": 0.25,
                  "init": "uniform"},
        "train": {"optimizer": "adam", "lr": 0.003, "schedule": "cosine", "num_epochs": 15, "batch_size": 64,
                  "num_steps": 64, "log_every": 4, "time_budget": 14.5,
                  "matmul_dtype": "bfloat16", "prefixes": ("ROMEO:",)},
    },
    "text": {        # a user's own text: keep every character, train on all of it, prompts from the text
        "data": {"preprocess": "unicode", "max_tokens": 0},
        "model": {"cell": "gru", "num_layers": 1, "embed_size": 64, "num_hiddens": 384, "dropout": 0.1,
                  "init": "uniform"},
        "train": {"optimizer": "adam", "lr": 0.004, "schedule": "cosine", "num_epochs": 0, "batch_size": 32,
                  "num_steps": 64, "log_every": 1, "time_budget": 15.0, "prefixes": ()},
    },
}
BOOK_CORPUS = "timemachine"     # the corpus of the book's run, and of every preset that names none
TORCH_ONLY = {"torch_impl", "matmul_dtype"}     # a preset's choices of torch path, dropped without torch


def apply(name: str, data: dict, model: dict, train: dict) -> tuple[dict, dict, dict]:
    """The preset's settings, overridden by the ones given (each a dict of config fields)."""
    try:
        preset = PRESETS[name]
    except KeyError:
        raise RnnlabError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
    return {**preset["data"], **data}, {**preset["model"], **model}, {**preset["train"], **train}


def _text_note(preprocess: str | None = None) -> str:
    """What `--preset text` sets, in one line, read from the preset itself (with the preprocessing of a
    prepared text, which decides over the preset's)."""
    data, model, train = (PRESETS["text"][part] for part in ("data", "model", "train"))
    return (f"using the defaults for your own text (--preset text; flags given override them): "
            f"{preprocess or data['preprocess']} preprocessing, all of the text, a {model['num_layers']}-layer "
            f"{model['cell'].upper()} (H={model['num_hiddens']}), {train['optimizer']} lr {train['lr']:g} "
            f"{train['schedule']} over about 8M training tokens, at most {train['time_budget']:g} min, prompts "
            "from the text; --preset book for the book's")


def resolve(preset: str | None, data: dict, model: dict, train: dict) -> tuple[dict, dict, dict, str | None]:
    """The settings a run uses, and a one-line note for the user (or None).

    With a preset, its settings overridden by the ones given (`apply`). With none, a corpus other than the
    book's (a file, or another named corpus) gets the `text` preset, so a user's novel is not trained as the
    book's 10,000 lower-cased letters; no corpus, or the book's, is the book's run, unchanged. Either way, a
    preset's prompts are for its own corpus: on another, and unless prefixes were given, they become () (the
    run takes its prompts from the text). Its torch path (`torch_impl`, `matmul_dtype`) is for torch: on
    another backend (`--backend numpy` or `jax`, or `auto` where torch is not installed), and unless given,
    those take their defaults.
    """
    note = None
    if preset is None and data.get("corpus", BOOK_CORPUS) != BOOK_CORPUS:
        preset, note = "text", _text_note(data.get("preprocess") if data.get("prepared") else None)
    if preset is None:
        return dict(data), dict(model), dict(train), None
    given = set(train)
    data, model, train = apply(preset, data, model, train)
    if backends.resolve(train.get("backend", "auto")) != "torch":      # a preset's torch path is for torch
        for key in TORCH_ONLY - given:
            train.pop(key, None)
    made_for = PRESETS[preset]["data"].get("corpus", BOOK_CORPUS)
    if data.get("corpus", BOOK_CORPUS) != made_for and "prefixes" not in given:
        train["prefixes"] = ()
    return data, model, train, note

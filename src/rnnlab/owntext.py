"""A user's own text: what a preprocessing mode would drop of it, and prompts taken from it.

`preprocessing_report` tells a user who trains on a French novel with the book's d2l preprocessing that every
accented letter is about to disappear; `report_line` turns it into one line, printed only when the loss is
large enough to matter. `prompts` gives the beginnings of a few lines of the text itself, so the samples
logged during training start from something the model has seen instead of the book's "time traveller".
"""
from __future__ import annotations

import collections
import itertools
import re

from . import text
from .errors import RnnlabError

# A line is worth printing when a mode removes or changes more than this share of the non-whitespace characters
# (about one character in every ten words of English: more than a few stray symbols) ...
AFFECTED_SHARE = 0.02
# ... or removes letters (accented, Greek, Cyrillic, ...) at more than this share: one in a thousand characters
# is one mangled word in every couple of hundred, which a model then learns to write.
LETTERS_REMOVED_SHARE = 0.001
TOP = 8                     # affected characters listed in a report
PROMPT_CHARS = 24           # the longest prompt
PROMPT_WORDS = 3
PROMPT_FALLBACK = 12        # characters taken from a text without spaces
START_LOOKAHEAD = 1000      # line starts looked at for one that begins a sentence

_CHANGE_VERB = {"d2l": "lower-cases", "letters": "lower-cases", "legacy": "lower-cases", "unicode": "normalises"}
_START = re.compile(r"(?:(?<=\n)|(?<=[.!?…]\s)|(?<=[。！？]))[ \t]*([^\W\d_])")   # a line or sentence's letter
_NON_SPACE = re.compile(r"\S")
_WORD_START = re.compile(r"(?<=\s)[^\W\d_]")                                      # a word's first letter
_WORD = re.compile(r"\S+")


def _effect(char: str, mode: str, token: str) -> str:
    """What a mode does to one character: 'kept', 'removed' (deleted or replaced by a space) or 'changed'."""
    out = text.preprocess(char, mode, token)
    if out == char:
        return "kept"
    return "removed" if not out.strip() else "changed"


def _top(counts: collections.Counter) -> list[tuple[str, int]]:
    """The most frequent characters, ties in code-point order (the same list on every run)."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP]


def preprocessing_report(raw: str, mode: str, token: str = "char") -> dict:
    """How much of `raw` a preprocessing mode removes or changes, counted over its non-whitespace characters
    (what happens to spaces and line breaks is layout, not content).

    The text is counted once; each distinct character is then put through the mode on its own, so a 2 MB
    text costs one Counter. 'removed' counts characters deleted or replaced by a space (é, digits and
    punctuation under d2l), 'changed' those turned into another character (capitals lower-cased; under
    unicode, characters NFC replaces such as the ohm sign).
    """
    if mode not in text.PREPROCESS_MODES:
        raise RnnlabError(f"unknown preprocess mode {mode!r}; choose from {', '.join(text.PREPROCESS_MODES)}")
    counts = collections.Counter(raw)
    removed, changed = collections.Counter(), collections.Counter()
    for char, n in counts.items():
        if not char.isspace():
            effect = _effect(char, mode, token)
            if effect != "kept":
                (removed if effect == "removed" else changed)[char] = n
    non_ws = sum(n for char, n in counts.items() if not char.isspace())
    letters = collections.Counter({char: n for char, n in removed.items() if char.isalpha()})
    share = (lambda n: n / non_ws) if non_ws else (lambda n: 0.0)
    return {"mode": mode, "characters": len(raw), "non_whitespace": non_ws,
            "removed": removed.total(), "changed": changed.total(), "letters_removed": letters.total(),
            "removed_share": share(removed.total()), "changed_share": share(changed.total()),
            "affected_share": share(removed.total() + changed.total()),
            "letters_removed_share": share(letters.total()), "top_removed": _top(removed),
            "top_letters_removed": _top(letters), "top_changed": _top(changed), "top": _top(removed + changed)}


def _shown(char: str) -> str:
    """A letter or digit as itself, anything else quoted (a comma in a list of counts, a zero-width space)."""
    return char if char.isalnum() else repr(char)


def _listed(top: list[tuple[str, int]], total: int, shown: int = 4) -> str:
    """'é ×5,123, ç ×812, ...': the first `shown` of `top` with their counts, '...' when there are others."""
    more = ", ..." if sum(n for _, n in top[:shown]) < total else ""
    return ", ".join(f"{_shown(char)} ×{n:,}" for char, n in top[:shown]) + more


def _removed_examples(report: dict) -> list[tuple[str, int]]:
    """The removed characters to name: letters first (an accent lost matters more than a comma), then the
    most frequent others."""
    letters = report["top_letters_removed"][:4]
    others = [(char, n) for char, n in report["top_removed"] if not char.isalpha()]
    return letters + others[:max(2, 4 - len(letters))]


def report_line(report: dict) -> str | None:
    """One line saying what the mode drops, when that is worth a user's attention (see AFFECTED_SHARE and
    LETTERS_REMOVED_SHARE), else None. Example: "d2l preprocessing removes or replaces 6.3% of the text's
    non-space characters (é ×5,123, ç ×812, ...) and lower-cases 2.1%; --preprocess unicode keeps them"."""
    if report["affected_share"] <= AFFECTED_SHARE and report["letters_removed_share"] <= LETTERS_REMOVED_SHARE:
        return None
    mode = report["mode"]
    verb = _CHANGE_VERB.get(mode, "changes")
    parts = []
    if report["removed"]:
        parts.append(f"removes or replaces {report['removed_share']:.1%} of the text's non-space characters "
                     f"({_listed(_removed_examples(report), report['removed'], shown=6)})")
    if report["changed"]:
        of_what = "" if parts else " of the text's non-space characters"
        parts.append(f"{verb} {report['changed_share']:.1%}{of_what} "
                     f"({_listed(report['top_changed'], report['changed'])})")
    keeps = "; --preprocess unicode keeps them" if mode != "unicode" else ""
    return f"{mode} preprocessing {' and '.join(parts)}{keeps}"


def _letter_start(padded: str, pos: int) -> int | None:
    """The first line or sentence start at or after `pos` whose letter is not lower-case (a sentence's
    beginning rather than a line broken mid-sentence), looking at the next START_LOOKAHEAD starts; else the
    first start at all."""
    first = None
    for match in itertools.islice(_START.finditer(padded, pos), START_LOOKAHEAD):
        if not match[1].islower():
            return match.start(1)
        first = match.start(1) if first is None else first
    return first


def _prompt_start(raw: str, pos: int) -> int | None:
    """Where the prompt for place `pos` starts: the first line or sentence after it that starts with a
    letter; else (a text with no line breaks or full stops after it, such as d2l's) the first word after it;
    else, wrapping round, the first such beginning in the text, or its first non-whitespace character;
    None for a blank text."""
    padded = "\n" + raw                  # the text's first character starts a line too
    start = _letter_start(padded, pos + 1)
    if start is not None:
        return start - 1
    match = _WORD_START.search(raw, pos)
    if match:
        return match.start()
    start = _letter_start(padded, 0)
    if start is not None:
        return start - 1
    match = _NON_SPACE.search(raw)
    return match.start() if match else None


def _prompt_at(raw: str, start: int) -> str:
    """Up to PROMPT_WORDS words of the line from `start`, at most PROMPT_CHARS characters, with the space
    after the last word when the line goes on; a first word too long for that gives PROMPT_FALLBACK
    characters (a text without spaces)."""
    line_end = raw.find("\n", start)
    line_end = len(raw) if line_end < 0 else line_end
    end = start
    for n, word in enumerate(_WORD.finditer(raw, start, line_end)):
        if n == PROMPT_WORDS or word.end() - start + 1 > PROMPT_CHARS:
            break
        end = word.end()
    if end == start:
        return raw[start: start + PROMPT_FALLBACK]
    return raw[start: end + 1] if raw[end: end + 1] == " " else raw[start:end]


def prompts(raw: str, count: int = 2, seed: int = 0) -> tuple[str, ...]:
    """Up to `count` distinct prompts taken from the text: the first words of the lines or sentences that
    begin at or after 25% of the way in, then every 60%/count further (shifted by `seed`; the places searched
    from stay in the first 90%, the part a run trains on). Deterministic: the same text and seed give the same
    prompts. Fewer than `count` when the text has fewer distinct beginnings; () for a blank text."""
    if not isinstance(count, int) or count < 1:
        raise RnnlabError(f"the number of prompts must be a positive integer, got {count!r}")
    found: list[str] = []
    for i in range(count):
        fraction = (0.25 + 0.6 * i / count + 0.37 * seed) % 0.9
        start = _prompt_start(raw, int(fraction * len(raw)))
        for _ in range(10):              # a prompt already taken: try the next beginning
            if start is None:
                return tuple(found)
            prompt = _prompt_at(raw, start)
            if prompt not in found:
                found.append(prompt)
                break
            start = _prompt_start(raw, start + 1)
    return tuple(found)

"""How `rnnlab score` shows a scored text (`lm.Scored`): a short readable summary, JSON, TSV rows, and a
self-contained HTML page that colours each character by its surprisal.

Shape legend: N = tokens of the text (tokens[0] is context only, so N - 1 are scored), K = alternatives shown
per position. Surprisal is -log2 P(token | the tokens before it), in bits; a token the model expected costs
well under a bit, one it thought nearly impossible 10 or more.
"""
from __future__ import annotations

import html
import math
from itertools import pairwise

import numpy as np

ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}
BIN_EDGES = (1, 2, 3, 4, 5, 6, 8, 10)         # bits: the upper edges of the colour bins; the last is open
COLOURS = ("#ffffff", "#fff3bf", "#ffe08a", "#fec35a", "#fd9a44", "#f46a35", "#dc3a2b", "#b3112b", "#6e0322")
SURPRISING = 5                                # the most surprising tokens the summary lists


def shown(token: str) -> str:
    """A token on one line: \\n, \\t, \\r and \\\\ escaped, and any other character that prints as nothing
    as \\xNN or \\uNNNN."""
    return "".join(ESCAPES.get(c) or (c if c.isprintable() else _code(c)) for c in token)


def quoted(token: str) -> str:
    return f"'{shown(token)}'"


def _code(char: str) -> str:
    return char.encode("unicode_escape", "backslashreplace").decode("ascii")


def _unit(scored) -> str:
    return "character" if scored.token == "char" else "word"


def _num(x: float, fmt: str) -> str:
    return format(x, fmt) if math.isfinite(x) else "inf" if x == math.inf else "nan"


def _percent(p: float, digits: int = 1) -> str:
    """A probability as a percentage (45.5%), or as 1.2e-05 where the percentage would show 0."""
    return f"{p:.{digits}%}" if p >= 10 ** -(digits + 2) or p == 0 else f"{p:.1e}"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def bins(scored) -> np.ndarray:
    """The colour bin (0 .. len(BIN_EDGES)) of each scored token, (N - 1,); nan falls in the last."""
    bits = scored.nll / math.log(2)
    return np.searchsorted(np.asarray(BIN_EDGES, dtype=np.float64), bits, side="right")


def surprising(scored, count: int = SURPRISING, apart: int = 4) -> list[int]:
    """Positions (1 .. N - 1) of the `count` most surprising tokens, the most surprising first, each at least
    `apart` tokens from those before it (so one odd word is listed once, not once per letter)."""
    chosen: list[int] = []
    for i in np.argsort(-scored.nll, kind="stable") + 1:
        if all(abs(int(i) - j) >= apart for j in chosen):
            chosen.append(int(i))
            if len(chosen) == count:
                break
    return chosen


def context(scored, i: int, before: int = 28, after: int = 10) -> str:
    """Token i among its neighbours, on one line: `...the time tra[v]eller sat...` (words: 6 before, 3 after)."""
    sep = "" if scored.token == "char" else " "
    if sep:
        before, after = 6, 3
    left, right = scored.tokens[max(0, i - before):i], scored.tokens[i + 1:i + 1 + after]
    middle = sep.join([*map(shown, left), f"[{shown(scored.tokens[i])}]", *map(shown, right)])
    return ("..." if i > before else "") + middle + ("..." if i + 1 + after < len(scored.tokens) else "")


def unknown_line(scored) -> str | None:
    """What the vocabulary lacks, in one line, or None when it lacks nothing."""
    if not scored.unknown:
        return None
    listed = ", ".join(f"{quoted(c)} x{n}" for c, n in list(scored.unknown.items())[:8])
    more = "" if len(scored.unknown) <= 8 else f" and {len(scored.unknown) - 8} more"
    total = sum(scored.unknown.values())
    were, their = ("was", "its score is that") if total == 1 else ("were", "their scores are those")
    return (f"{_plural(total, _unit(scored))} the model's vocabulary lacks ({listed}{more}) {were} read as <unk>, "
            f"an unknown token: {their} of <unk>")


def heading(scored, checkpoint: str | None = None, epoch: int | None = None) -> str:
    """`1,000 characters, 999 scored (the first is context) under DIR (epoch 20)`."""
    n, unit = len(scored.tokens), _unit(scored)
    under = f" under {checkpoint}" if checkpoint else ""
    at = f" (epoch {epoch})" if epoch is not None else ""
    return f"{_plural(n, unit)}, {n - 1:,} scored (the first is context){under}{at}"


def summary_text(scored, source: str, checkpoint: str | None = None, epoch: int | None = None) -> str:
    """The readable summary: totals, the most surprising tokens in their context, what the vocabulary lacks."""
    s, unit = scored.summary(), _unit(scored)
    per = "char" if unit == "character" else "token"
    lines = [f"{shown(source)}: {heading(scored, checkpoint, epoch)}",
             (f"{_num(s['bits_per_token'], '.3f')} bits/{per}, perplexity {_num(s['perplexity'], '.2f')}, "
              f"{_num(s['total_bits'], ',.1f')} bits in all"),
             "most surprising:"]
    for i in surprising(scored):
        bits = scored.nll[i - 1] / math.log(2)
        top = scored.top[i - 1]
        expected = f"  (expected {quoted(top[0][0])}, {_percent(top[0][1], 0)})" if top else ""
        lines.append(f"  {_num(bits, '5.2f')} bits  {context(scored, i)}{expected}")
    unknown = unknown_line(scored)
    if unknown:
        lines.append(unknown)
    return "\n".join(lines)


def document(scored, source: str, checkpoint: str | None = None, epoch: int | None = None) -> dict:
    """What `--json` prints: where the text came from, the totals, and one row per token (`Scored.rows`)."""
    return {"source": source, "checkpoint": checkpoint, "epoch": epoch, "summary": scored.summary(),
            "rows": scored.rows()}


def tsv(scored) -> str:
    """One row per token: index, token (escaped), log-probability (nats), bits, then K (token, probability)
    column pairs; the first token, context only, has no score."""
    k = max((len(t) for t in scored.top), default=0)
    header = ["index", "char" if scored.token == "char" else "token", "logprob", "bits"]
    header += [name for j in range(1, k + 1) for name in (f"top{j}", f"p{j}")]
    lines = ["\t".join(header), f"0\t{shown(scored.tokens[0])}\t\t" + "\t" * 2 * k]
    for i, (nll, top) in enumerate(zip(scored.nll, scored.top), start=1):
        cells = [str(i), shown(scored.tokens[i]), f"{-nll:.6f}", f"{nll / math.log(2):.6f}"]
        cells += [c for t, p in top for c in (shown(t), f"{p:.6f}")]
        lines.append("\t".join(cells))
    return "\n".join(lines)


# --- the HTML page -------------------------------------------------------------------------------------------

CSS = """
body { margin: 0; background: #fafaf7; color: #1d1d1f;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; }
header { padding: 18px 28px 12px; background: #fff; border-bottom: 1px solid #e4e2dc; }
h1 { font-size: 19px; margin: 0 0 4px; font-weight: 600; }
.meta { color: #6b6b70; margin: 0 0 10px; font-size: 13px; }
.stats { margin: 0 0 10px; font-size: 15px; }
.stats b { font-size: 18px; font-variant-numeric: tabular-nums; }
.note { margin: 0 0 10px; padding: 6px 10px; background: #fff6e0; border-left: 3px solid #e8a317; font-size: 13px; }
.legend + .legend { margin-top: 6px; }
.legend { display: flex; align-items: center; flex-wrap: wrap; gap: 4px; font-size: 12px; color: #55555a; }
.legend .sw { display: inline-block; min-width: 38px; padding: 2px 4px; text-align: center; border-radius: 3px;
              border: 1px solid #d8d6cf; font-variant-numeric: tabular-nums; }
.legend .lab { margin: 0 6px 0 0; }
.legend .gap { width: 14px; }
main { padding: 18px 28px 40px; }
.text { margin: 0; max-width: 86ch; white-space: pre-wrap; overflow-wrap: anywhere;
        font: 15px/1.75 "DejaVu Sans Mono", ui-monospace, Menlo, Consolas, monospace; }
.text span { border-radius: 2px; }
.text .c:hover, .text .x:hover { outline: 2px solid #1d1d1f; }
.x { color: #8a8a8f; background: repeating-linear-gradient(45deg, #eeede8, #eeede8 3px, #e2e0d9 3px, #e2e0d9 6px); }
.u { outline: 1px dashed #1d1d1f; outline-offset: -1px; }
.nl::before { content: "\\21B5"; opacity: .5; }
.esc { color: #6b6b70; font-style: italic; }
#tip { position: fixed; z-index: 10; pointer-events: none; background: #1d1d1f; color: #fafaf7;
       padding: 7px 10px; border-radius: 5px; font: 12px/1.45 "DejaVu Sans Mono", ui-monospace, monospace;
       white-space: pre; box-shadow: 0 3px 12px rgba(0,0,0,.25); }
"""
CSS += "".join(f".b{i} {{ background: {c}; }}\n" for i, c in enumerate(COLOURS))
CSS += ".b6, .b7, .b8 { color: #fff; }\n"

# the title attribute is the tooltip without JavaScript; with it, a styled one shows the same text at once
SCRIPT = """
(function () {
  var tip = document.getElementById("tip");
  var text = document.querySelector(".text");
  text.addEventListener("mouseover", function (e) {
    var s = e.target;
    if (s.tagName !== "SPAN") { tip.hidden = true; return; }
    if (s.title) { s.dataset.tip = s.title; s.removeAttribute("title"); }
    tip.textContent = s.dataset.tip || "";
    tip.hidden = false;
  });
  text.addEventListener("mousemove", function (e) {
    var x = e.clientX + 14, y = e.clientY + 16;
    if (x + tip.offsetWidth > window.innerWidth - 8) x = e.clientX - tip.offsetWidth - 10;
    if (y + tip.offsetHeight > window.innerHeight - 8) y = e.clientY - tip.offsetHeight - 10;
    tip.style.left = x + "px"; tip.style.top = y + "px";
  });
  text.addEventListener("mouseleave", function () { tip.hidden = true; });
})();
"""


def _attr(text: str) -> str:
    """Text for a double-quoted attribute (or an element): &, <, > and " escaped; ' left as it is."""
    return html.escape(text, quote=False).replace('"', "&quot;")


def _char_html(token: str) -> str:
    """A token's text in the page: itself (escaped), or its \\xNN form where it would print as nothing (a
    newline stays a newline: the page breaks the line there)."""
    return html.escape("".join(c if c.isprintable() or c in "\n\t" else _code(c) for c in token), quote=False)


def _classes(token: str, base: str, unknown: bool) -> str:
    names = [base]
    if token == "\n":
        names.append("nl")
    elif any(not (c.isprintable() or c == "\t") for c in token):
        names.append("esc")
    if unknown:
        names.append("u")
    return " ".join(names)


def _tip(token: str, bits: float, prob: float, top) -> str:
    """The tooltip of a token: its surprisal and probability, then the model's K most likely tokens there."""
    lines = [f"{quoted(token)}  {_num(bits, '.2f')} bits  (p {_percent(prob)})"]
    if top:
        lines.append("the model expected:")
        lines += [f"  {_percent(p):>7}  {quoted(t)}" + ("  (actual)" if t == token else "") for t, p in top]
    return "\n".join(lines)


def _spans(scored) -> str:
    """One <span> per token: the first as context (class x), every scored one with class c, its colour bin
    b0..b8 and data-bits."""
    first = scored.tokens[0]
    out = [(f'<span class="{_classes(first, "x", first in scored.unknown)}" title="{_attr(quoted(first))}'
            f' (context: the first token is not scored)">{_char_html(first)}</span>')]
    sep = "" if scored.token == "char" else " "
    for i, (nll, top, b) in enumerate(zip(scored.nll, scored.top, bins(scored)), start=1):
        token, bits = scored.tokens[i], float(nll) / math.log(2)
        tip = _tip(token, bits, math.exp(-float(nll)), top)
        out.append(f'{sep}<span class="{_classes(token, f"c b{b}", token in scored.unknown)}" '
                   f'data-bits="{_num(bits, ".3f")}" title="{_attr(tip)}">{_char_html(token)}</span>')
    return "".join(out)


def _legend() -> str:
    edges = (0,) + BIN_EDGES
    swatches = [f'<span class="sw b{i}">{lo}–{hi}</span>' for i, (lo, hi) in enumerate(pairwise(edges))]
    swatches.append(f'<span class="sw b{len(BIN_EDGES)}">{BIN_EDGES[-1]}+</span>')
    return ('<div class="legend"><span class="lab">surprisal, bits:</span>' + "".join(swatches) + '</div>\n'
            '<div class="legend"><span class="sw x">T</span><span class="lab">context (not scored)</span>'
            '<span class="sw u">é</span><span class="lab">not in the vocabulary (read as &lt;unk&gt;)</span>'
            '<span class="sw nl"></span><span class="lab">a line break</span>'
            '<span class="gap"></span><span class="lab">hover a character for the model\'s alternatives</span>'
            '</div>')


def html_page(scored, source: str, checkpoint: str | None = None, epoch: int | None = None) -> str:
    """A self-contained page (inline CSS and JS, nothing fetched): the summary, a colour legend, and the text
    with each token coloured by its surprisal and its alternatives on hover."""
    s, unit = scored.summary(), _unit(scored)
    per = "char" if unit == "character" else "token"
    unknown, source = unknown_line(scored), shown(source)
    return "".join([
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f"<title>rnnlab score: {_attr(source)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<header>\n",
        f"<h1>Surprisal of {_attr(source)}</h1>\n",
        f'<p class="meta">{_attr(heading(scored, checkpoint, epoch))}</p>\n',
        (f'<p class="stats"><b>{_num(s["bits_per_token"], ".3f")}</b> bits/{per} &middot; perplexity '
         f'<b>{_num(s["perplexity"], ".2f")}</b> &middot; {_num(s["total_bits"], ",.0f")} bits in all</p>\n'),
        f'<p class="note">{_attr(unknown)}</p>\n' if unknown else "",
        _legend(), "\n</header>\n<main>\n",
        f'<pre class="text">{_spans(scored)}</pre>\n</main>\n',
        f'<div id="tip" hidden></div>\n<script>{SCRIPT}</script>\n</body>\n</html>\n',
    ])

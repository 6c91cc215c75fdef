"""The page at `/` of `rnnlab serve`, driven in headless Chromium: a real server in a subprocess, a prompt typed,
the streamed text seen, a text scored into a heat map of one coloured span per character, the training curve
drawn. Screenshots land in test-artifacts/. Debian's chromium is used; no browser is ever downloaded."""
import contextlib
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from rnnlab import cli

from conftest import DATA

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'rnnlab[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH: apt-get install chromium (the page's tests never download a browser)",
                allow_module_level=True)

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
RUN = ["--cell", "gru", "--preprocess", "unicode", "--max-tokens", "3000", "--num-hiddens", "32", "--batch-size",
       "8", "--num-steps", "16", "--num-epochs", "4", "--log-every", "1", "--optimizer", "adam", "--lr", "0.01",
       "--backend", "numpy", "--quiet"]
SCORED = "The Time Traveller (for so it will be\nconvenient to speak of him) was expounding."


def _env(base: Path) -> dict:
    return {**os.environ, "RNNLAB_DATA": str(DATA), "XDG_CACHE_HOME": str(base / "cache")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`rnnlab serve --port 0` on a small model, in a subprocess that is always ended; yields its URL."""
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")
    base = tmp_path_factory.mktemp("browser")
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _env(base).items():
            mp.setenv(k, v)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            assert cli.main(["train", *RUN, "--out", str(base / "run")]) == 0, err.getvalue()
    log = base / "serve.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "rnnlab", "serve", "--checkpoint", str(base / "run"),
                                 "--port", "0", "--log-level", "warning"], env=_env(base), cwd=base,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        url = _url(proc, log)
        _wait_healthy(url)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _url(proc, log: Path, timeout: float = 30) -> str:
    """The URL the server prints once it listens."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    match = re.search(r"http://\S+/", line)
    if not match:
        raise AssertionError(f"the server printed no URL: {line!r}\n{log.read_text()}")
    return match[0]


def _wait_healthy(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "healthz", timeout=2) as r:
                if json.load(r)["status"] == "ok":
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server):
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server)
    pg.wait_for_selector("body[data-ready=true]", timeout=10_000)
    yield pg
    context.close()
    assert not errors, errors                      # no script error on the page


def _set(page, control: str, value) -> None:
    page.eval_on_selector(f"#{control}", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                          str(value))


def test_header_and_training_curve(page, server):
    info = json.load(urllib.request.urlopen(server + "v1/model"))
    facts = page.inner_text("#facts")
    assert "GRU 32" in facts and "timemachine" in facts and f"{info['vocab']['size']} chars" in facts
    assert f"{info['heldout_perplexity']:.4g}" in facts
    assert page.input_value("#prompt") == info["prompts"][0]               # the run's own first prompt
    for key in ("train_ppl", "val_ppl"):                                    # both curves, a point per record
        points = page.get_attribute(f"#curve polyline.line-{key}", "points").split()
        assert len(points) == len(info["metrics"]) == 4
    assert page.locator("#curve circle").count() == 8
    assert page.locator("#curve text").count() > 4                          # ticks and axis labels


def test_generate_streams_into_the_page(page, server):
    page.fill("#prompt", "The Time Machine")
    _set(page, "num_preds", 400)
    _set(page, "num_samples", 2)
    _set(page, "temperature", 0.6)
    assert page.inner_text("#num_preds-v") == "400" and page.inner_text("#temperature-v") == "0.60"
    page.click("#generate")
    page.wait_for_function("document.querySelector('#samples .g') && "
                           "document.querySelector('#samples .g').textContent.length > 0")
    page.wait_for_function("document.querySelector('#gen-status').textContent.includes('chars in')")
    shown = page.locator("#samples .out").all_inner_texts()
    want = _post(server + "v1/generate", {"prompt": "The Time Machine", "num_preds": 400, "num_samples": 2,
                                          "temperature": 0.6, "seed": 0})["samples"]
    assert [s.replace("\r\n", "\n") for s in shown] == want                 # the pieces, put together
    assert page.locator("#samples .out.live").count() == 0                  # the cursor is gone once done
    assert page.is_hidden("#gen-error")
    page.screenshot(path=str(ARTIFACTS / "serve-generate.png"), full_page=True)


def test_errors_are_shown(page):
    page.fill("#prompt", "")
    page.click("#generate")
    page.wait_for_selector("#gen-error:not([hidden])")
    assert "prompt is empty" in page.inner_text("#gen-error")


def test_score_draws_one_coloured_span_per_character(page, server):
    page.click("#tab-score")
    assert page.is_visible("#view-score") and page.is_hidden("#view-generate")
    page.fill("#score-text", SCORED)
    page.click("#score")
    page.wait_for_selector("#score-result:not([hidden])")
    spans = page.locator("#heat > span.c")
    assert spans.count() == len(SCORED) == page.locator("#heat > *").count()
    colours = spans.evaluate_all("s => s.map(e => getComputedStyle(e).backgroundColor)")
    assert all(c not in ("", "rgba(0, 0, 0, 0)", "transparent") for c in colours)
    assert len(set(colours)) > 5                                            # surprisal varies, so does colour
    bits = spans.evaluate_all("s => s.map(e => e.dataset.bits === undefined ? null : Number(e.dataset.bits))")
    want = _post(server + "v1/score", {"text": SCORED, "top": 5})
    assert bits[0] is None and bits[1:] == pytest.approx([r["bits"] for r in want["rows"][1:]], abs=1e-3)
    assert "likeliest" in spans.nth(5).get_attribute("title")
    assert f"{want['summary']['perplexity']:.4g}" in page.inner_text("#score-summary")
    spans.nth(12).hover()
    page.wait_for_selector("#tip:not([hidden])")
    assert page.locator("#tip .alt").count() == 5
    page.screenshot(path=str(ARTIFACTS / "serve-score.png"), full_page=True)


def test_a_sample_can_be_scored_from_its_card(page):
    page.fill("#prompt", "It was")
    _set(page, "num_preds", 60)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#gen-status').textContent.includes('chars in')")
    text = page.inner_text("#samples .out")
    page.click("#samples .sample-head button")
    page.wait_for_selector("#score-result:not([hidden])")
    assert page.input_value("#score-text") == text
    assert page.locator("#heat > span.c").count() == len(text)

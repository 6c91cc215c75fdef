"""`rnnlab serve`'s API, in process through FastAPI's TestClient: every endpoint gives what the library gives,
the stream adds up to the plain answer, every limit and every malformed request is a 4xx with a JSON error
(never a 500), concurrent requests get what sequential ones get, and a full server refuses rather than hangs."""
import contextlib
import dataclasses
import io
import json
import socket
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'rnnlab[serve]'")
pytest.importorskip("httpx", reason="the API tests need httpx (the dev extra)")

with warnings.catch_warnings():          # starlette's note that its test client will move to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from rnnlab import cli  # noqa: E402
from rnnlab.config import GenerateConfig  # noqa: E402
from rnnlab.lm import LM  # noqa: E402
from rnnlab.serve import Limits  # noqa: E402
from rnnlab.serve.app import create_app  # noqa: E402

from conftest import DATA  # noqa: E402

TINY = ["--num-hiddens", "16", "--batch-size", "4", "--num-steps", "5", "--max-tokens", "400",
        "--num-epochs", "2", "--log-every", "1", "--backend", "numpy", "--quiet"]
GRU = ["--cell", "gru", "--preprocess", "unicode", "--max-tokens", "2000", "--num-hiddens", "24",
       "--batch-size", "4", "--num-steps", "8", "--num-epochs", "2", "--log-every", "1", "--backend", "numpy",
       "--quiet"]
LIMITS = Limits(max_prompt_chars=50, max_new_tokens=300, max_samples=4, max_score_chars=400,
                max_request_bytes=4096, max_concurrent=2, queue_timeout=5.0)


def _train(tmp_path_factory, name: str, argv: list[str]):
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")
    base = tmp_path_factory.mktemp(name)
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RNNLAB_DATA", str(DATA))
        mp.setenv("XDG_CACHE_HOME", str(base / "cache"))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            assert cli.main(["train", *argv, "--out", str(base / "run")]) == 0, err.getvalue()
    return base / "run"


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    """The book's kind of model (tanh RNN, d2l text): greedy by default."""
    return _train(tmp_path_factory, "book", TINY)


@pytest.fixture(scope="module")
def gru(tmp_path_factory):
    """A GRU on unicode text: sampled at 0.8 by default."""
    return _train(tmp_path_factory, "gru", GRU)


@pytest.fixture(scope="module")
def book_lm(book):
    return LM.load(book, "numpy")


@pytest.fixture(scope="module")
def gru_lm(gru):
    return LM.load(gru, "numpy")


@pytest.fixture(scope="module")
def client(gru_lm):
    with TestClient(create_app(gru_lm, LIMITS)) as c:
        yield c


@pytest.fixture(scope="module")
def book_client(book_lm):
    with TestClient(create_app(book_lm, LIMITS)) as c:
        yield c


def sse(body: str) -> list[tuple[str, dict]]:
    """Server-sent events as (name, data) pairs."""
    events = []
    for block in body.split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def assert_error(response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and body["error"] and "\n" not in body["error"]
    for fragment in fragments:
        assert fragment in body["error"], body["error"]
    return body


# --- endpoints ---------------------------------------------------------------------------------------------------

def test_model_describes_the_model_and_its_run(client, gru_lm):
    info = client.get("/v1/model").json()
    assert info["architecture"]["cell"] == "gru" and info["architecture"]["num_hiddens"] == 24
    assert info["vocab"]["size"] == len(gru_lm.vocab) == len(info["vocab"]["tokens"])
    assert info["prompts"] == list(gru_lm.prompts) and info["default_temperature"] == 0.8
    assert [r["epoch"] for r in info["metrics"]] == [1, 2]
    assert info["heldout_perplexity"] == info["metrics"][-1]["val_ppl"] > 1
    assert info["limits"] == dataclasses.asdict(LIMITS)


def test_health_page_and_static_files(client):
    assert client.get("/healthz").json() == {"status": "ok", "busy": 0, "waiting": 0}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="/static/app.js"' in page.text
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "/v1/generate" in script.text


def test_openapi_lists_the_endpoints_and_every_option(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/score", "/v1/model", "/healthz"} <= set(schema["paths"])
    request = schema["components"]["schemas"]["GenerateRequest"]
    names = {f.name for f in dataclasses.fields(GenerateConfig)} - {"prefix"} | {"prompt", "stream"}
    assert set(request["properties"]) == names
    assert request["additionalProperties"] is False
    assert "warmed up" in request["properties"]["prompt"]["description"]


@pytest.mark.parametrize("which", ["book", "gru"])
def test_generate_is_what_the_library_generates(which, request):
    lm = request.getfixturevalue(f"{which}_lm")
    c = request.getfixturevalue("client" if which == "gru" else "book_client")
    body = {"prompt": "The Time", "num_preds": 40, "num_samples": 3, "seed": 5}
    got = c.post("/v1/generate", json=body).json()
    want = lm.generate("The Time", lm.options(num_preds=40, num_samples=3, seed=5))
    assert got["samples"] == want and got["prompt"] == lm.prompt("The Time").text
    assert got["options"]["temperature"] == (0.0 if which == "book" else 0.8)    # the model's default
    assert all(len(s) == len(got["prompt"]) + 40 for s in got["samples"])


def test_generate_options(client, gru_lm):
    assert client.post("/v1/generate", json={}).json()["prompt"] == gru_lm.prompts[0]
    for options in ({"temperature": 1.3, "top_k": 5, "top_p": 0.9, "seed": 3},
                    {"beam": 3, "num_samples": 2, "length_penalty": 0.5},
                    {"temperature": 0, "stop": ["e", "xyz"]}):
        got = client.post("/v1/generate", json={"prompt": "the", "num_preds": 30, **options})
        assert got.status_code == 200, got.text
        cfg = gru_lm.options(**{k: tuple(v) if k == "stop" else v for k, v in options.items()}, num_preds=30)
        assert got.json()["samples"] == gru_lm.generate("the", cfg)
    stopped = client.post("/v1/generate", json={"prompt": "the", "temperature": 0, "stop": ["e"]}).json()
    assert "e" not in stopped["samples"][0][3:]


def test_unknown_prompt_characters_are_reported(client):
    got = client.post("/v1/generate", json={"prompt": "the ☃", "num_preds": 5, "stop": ["☃"]}).json()
    assert got["unknown"] == {"☃": 1} and got["unreachable_stops"] == ["☃"]


@pytest.mark.parametrize("options", [{"num_samples": 3, "seed": 11}, {"temperature": 0}, {"beam": 3, "num_samples": 2},
                                     {"stop": [" "], "num_samples": 4}])
def test_stream_adds_up_to_the_plain_answer(client, options):
    body = {"prompt": "It was", "num_preds": 120, **options}
    plain = client.post("/v1/generate", json=body).json()
    response = client.post("/v1/generate", json={**body, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse(response.text)
    names = [name for name, _ in events]
    assert names[0] == "prompt" and names[-1] == "done" and set(names[1:-1]) <= {"piece"}
    head = events[0][1]
    assert head["prompt"] == plain["prompt"] and head["options"] == plain["options"]
    texts = [head["prompt"]] * len(plain["samples"])
    for name, data in events[1:-1]:
        assert set(data) == {"sample", "text"} and data["text"]
        texts[data["sample"]] += data["text"]
    assert texts == plain["samples"] == events[-1][1]["samples"]
    assert client.get("/healthz").json()["busy"] == 0         # the stream gave its slot back


def test_score_is_what_the_library_scores(client, gru_lm):
    text = "The Time Traveller was here.\nHe smiled."
    got = client.post("/v1/score", json={"text": text, "top": 3}).json()
    scored = gru_lm.score(text, top=3)
    assert got["summary"] == scored.summary()                 # floats survive JSON exactly
    assert len(got["rows"]) == len(text) and [r["token"] for r in got["rows"]] == list(text)
    assert got["rows"][0]["bits"] is None and all(len(r["top"]) == 3 for r in got["rows"][1:])
    assert got["rows"] == scored.rows()


# --- every limit, every bad request: a 4xx with {"error": ...} -----------------------------------------------------

@pytest.mark.parametrize("body, fragment", [
    ({"prompt": "x" * 51}, "--max-prompt-chars"),
    ({"num_preds": 301}, "--max-new-tokens"),
    ({"num_samples": 5}, "--max-samples"),
    ({"beam": 5}, "--max-samples"),
])
def test_generate_limits(client, body, fragment):
    assert_error(client.post("/v1/generate", json=body), 422, fragment)
    assert_error(client.post("/v1/generate", json={**body, "stream": True}), 422, fragment)


def test_score_limit(client):
    assert_error(client.post("/v1/score", json={"text": "a" * 401}), 422, "--max-score-chars")
    assert client.post("/v1/score", json={"text": "a" * 400}).status_code == 200


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/score"])
def test_huge_bodies_are_refused_unread(client, path):
    huge = b'{"text": "' + b"a" * 10_000_000 + b'"}'
    assert_error(client.post(path, content=huge, headers={"content-type": "application/json"}), 413,
                 "--max-request-bytes")

    def chunks():                                 # no Content-Length: counted as it arrives
        for _ in range(100):
            yield b" " * 1000
    assert_error(client.post(path, content=chunks(), headers={"content-type": "application/json"}), 413)
    assert_error(client.post(path, content=b"{}", headers={"content-length": "abc"}), 400, "Content-Length")


@pytest.mark.parametrize("content, status, fragment", [
    (b"{bad json", 400, "not valid JSON"),
    (b'{"prompt": "a",}', 400, "not valid JSON"),
    (b"", 422, "JSON object"),
    (b"[1, 2]", 422, "body"),
    (b'"the"', 422, "body"),
    (b'{"promt": "the"}', 422, "promt"),
    (b'{"prompt": "the", "num_chars": 5}', 422, "num_chars"),
    (b'{"num_preds": "10"}', 422, "num_preds"),
    (b'{"num_preds": 10.5}', 422, "num_preds"),
    (b'{"num_preds": true}', 422, "num_preds"),
    (b'{"num_preds": -1}', 422, "num_preds"),
    (b'{"temperature": "hot"}', 422, "temperature"),
    (b'{"temperature": NaN}', 422, "temperature"),
    (b'{"temperature": -1}', 422, "temperature"),
    (b'{"top_p": 0}', 422, "top_p"),
    (b'{"top_k": [1]}', 422, "top_k"),
    (b'{"seed": 99999999999999999999999}', 422, "seed"),
    (b'{"stop": "e"}', 422, "stop"),
    (b'{"stop": [""]}', 422, "stop"),
    (b'{"prompt": 5}', 422, "prompt"),
    (b'{"stream": "yes"}', 422, "stream"),
    (b'{"prompt": ""}', 422, "prompt is empty"),                                  # the library's own errors
    (b'{"beam": 2, "temperature": 0.5}', 422, "beam search is deterministic"),
    (b'{"beam": 2, "num_samples": 3}', 422, "beams"),
])
def test_bad_generate_requests(client, content, status, fragment):
    response = client.post("/v1/generate", content=content, headers={"content-type": "application/json"})
    assert_error(response, status, fragment)


@pytest.mark.parametrize("body, fragment", [
    ({}, "text"), ({"text": 5}, "text"), ({"text": "ab", "top": 21}, "top"), ({"text": "ab", "top": -1}, "top"),
    ({"text": "ab", "extra": 1}, "extra"), ({"text": "a"}, "at least 2"), ({"text": ""}, "empty"),
])
def test_bad_score_requests(client, body, fragment):
    assert_error(client.post("/v1/score", json=body), 422, fragment)


def test_validation_errors_name_each_field(client):
    body = client.post("/v1/generate", json={"num_preds": "x", "top_k": -2, "bogus": 1}).json()
    assert {e["field"] for e in body["errors"]} == {"num_preds", "top_k", "bogus"}


def test_unknown_routes_and_methods_are_json(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/generate"), 405)
    assert_error(client.post("/healthz"), 405)


# --- concurrency ---------------------------------------------------------------------------------------------------

def test_concurrent_requests_get_what_sequential_ones_get(client):
    bodies = [{"prompt": "The", "num_preds": 150, "num_samples": 1 + i % 3, "seed": i, "stream": i % 2 == 1}
              for i in range(12)]

    def ask(body):
        response = client.post("/v1/generate", json=body)
        assert response.status_code == 200, response.text
        return sse(response.text)[-1][1]["samples"] if body["stream"] else response.json()["samples"]
    sequential = [ask(b) for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(ask, bodies))
    assert concurrent == sequential
    assert client.get("/healthz").json()["busy"] == 0


class Held:
    """An LM whose decoding waits until released: a request that holds the only slot for as long as a test
    needs."""

    def __init__(self, lm):
        self.lm, self.entered, self.release = lm, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def generate(self, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(10)
        return self.lm.generate(*args, **kwargs)


@pytest.mark.parametrize("queue_timeout", [0.0, 0.3])
def test_a_full_server_refuses_with_503(gru_lm, queue_timeout):
    held = Held(gru_lm)
    limits = dataclasses.replace(LIMITS, max_concurrent=1, queue_timeout=queue_timeout)
    with TestClient(create_app(held, limits)) as c, ThreadPoolExecutor(1) as pool:
        first = pool.submit(c.post, "/v1/generate", json={"prompt": "the", "num_preds": 10})
        assert held.entered.wait(10)
        for body in ({"prompt": "a"}, {"prompt": "a", "stream": True}):
            refused = c.post("/v1/generate", json=body)
            assert_error(refused, 503, "busy", "--max-concurrent")
            assert refused.headers["retry-after"] == "1"
        assert_error(c.post("/v1/score", json={"text": "abc"}), 503, "busy")
        assert c.get("/healthz").json()["busy"] == 1
        held.release.set()
        assert first.result(10).status_code == 200
        assert c.post("/v1/generate", json={"prompt": "a", "num_preds": 3}).status_code == 200
        assert c.get("/healthz").json() == {"status": "ok", "busy": 0, "waiting": 0}


def test_a_waiting_request_is_served_once_a_slot_frees(gru_lm):
    held = Held(gru_lm)
    limits = dataclasses.replace(LIMITS, max_concurrent=1, queue_timeout=10.0)
    with TestClient(create_app(held, limits)) as c, ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.post, "/v1/generate", json={"prompt": "the", "num_preds": 10})
        assert held.entered.wait(10)
        second = pool.submit(c.post, "/v1/score", json={"text": "the time"})
        deadline = time.monotonic() + 10
        while c.get("/healthz").json()["waiting"] != 1:
            assert time.monotonic() < deadline
        held.release.set()
        assert first.result(10).status_code == 200 and second.result(10).status_code == 200


# --- the command ---------------------------------------------------------------------------------------------------

def run_cli(capsys, *argv):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_serve_help_lists_every_limit(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["serve", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(Limits):
        assert "--" + f.name.replace("_", "-") in out
    for flag in ("--checkpoint", "--host", "--port", "--backend", "--device", "--threads"):
        assert flag in out


def _one_line(code, err, *fragments):
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err


def test_serve_without_the_extra_says_how_to_install(capsys, monkeypatch, book):
    monkeypatch.setitem(sys.modules, "uvicorn", None)                  # `import uvicorn` raises ImportError
    _one_line(*run_cli(capsys, "serve", "--checkpoint", book), "pip install 'rnnlab[serve]'")


def test_serve_refuses_bad_settings_in_one_line(capsys, book, tmp_path):
    _one_line(*run_cli(capsys, "serve", "--checkpoint", book, "--max-samples", "0"), "--max-samples")
    _one_line(*run_cli(capsys, "serve", "--checkpoint", book, "--queue-timeout", "-1"), "--queue-timeout")
    _one_line(*run_cli(capsys, "serve", "--checkpoint", tmp_path / "none"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        _one_line(*run_cli(capsys, "serve", "--checkpoint", book, "--port", port), "cannot listen", str(port))


# --- a real server: sockets, keep-alive, the load test ---------------------------------------------------------------

@pytest.fixture
def live(gru_lm):
    """The app on a loopback port, served by uvicorn in a thread."""
    uvicorn = pytest.importorskip("uvicorn")
    from rnnlab.serve.app import listen, url_of
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(gru_lm, LIMITS), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_load_test_against_a_real_server(live, capsys):
    from rnnlab.serve import loadtest
    assert loadtest.main([live, "--requests", "12", "--num-preds", "30", "--score-requests", "4",
                          "--score-chars", "200", "--concurrency", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requests"] == 16 and "gru 1x24" in report["model"]
    assert report["kinds"]["generate"]["statuses"] == {"200": 12}
    assert report["kinds"]["score"]["statuses"] == {"200": 4}
    g = report["kinds"]["generate"]
    assert 0 < g["p50_ms"] <= g["p90_ms"] <= g["p99_ms"] <= g["max_ms"]
    assert g["generated_chars_per_s"] > 0


def test_load_test_without_a_server_says_so(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                 # bound, not listening: nothing answers
        from rnnlab.serve import loadtest
        assert loadtest.main([f"http://127.0.0.1:{port}/", "--requests", "1"]) == 1
    assert "no rnnlab server" in capsys.readouterr().err

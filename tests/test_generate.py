"""`lm.LM` and `rnnlab generate`: prompts read as the training text was, default decoding that fits the model,
several continuations clearly separated, streaming, stop texts, beam search and the errors of bad options."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import one_line_error, run_cli
from rnnlab.config import DataConfig, GenerateConfig, ModelConfig, TrainConfig
from rnnlab.errors import RnnlabError
from rnnlab.lm import LM, SAMPLING_TEMPERATURE
from rnnlab.text import Vocab


def fake_backend(V, favourite=1):
    """A backend whose every step prefers token `favourite`, and <unk> (id 0) even more."""
    def step(token_ids, state):
        logits = np.zeros((len(token_ids), V))
        logits[:, favourite] = 3.0
        logits[:, 0] = 5.0
        return logits, state
    return SimpleNamespace(decoder=lambda: step, begin_state=lambda b: np.zeros((1, b, 1)))


def lm(preprocess="d2l", cell="rnn", chars="abcdefghijklmnopqrstuvwxyz ", prefixes=("time traveller",)):
    return LM(fake_backend(len(chars) + 1), Vocab(chars), DataConfig(preprocess=preprocess), ModelConfig(cell=cell),
              TrainConfig(prefixes=prefixes))


# --- the library ------------------------------------------------------------------------------------------

def test_a_prompt_is_read_as_the_training_text_was():
    book = lm()
    p = book.prompt("The Time-Traveller!")
    assert p.text == "the time traveller " and p.unknown == {}
    own = lm("unicode", "gru", chars="abcé ")
    p = own.prompt("Été à b\u0065\u0301")                         # decomposed é becomes one character (NFC)
    assert p.text == "Été à bé" and p.unknown == {"É": 1, "t": 1, "à": 1}
    assert own.generate("Été", num_preds=3, temperature=0)[0] == "Étéaaa"   # echoed as typed, never "<unk>"
    with pytest.raises(RnnlabError, match="prompt is empty"):
        book.prompt("")


def test_defaults_greedy_for_the_books_model_sampling_for_others():
    assert lm().options().temperature == 0.0
    assert lm(cell="gru").options().temperature == SAMPLING_TEMPERATURE
    assert lm("unicode").options().temperature == SAMPLING_TEMPERATURE
    assert lm(cell="gru").options(beam=3).temperature == 0.0       # beam search is deterministic
    assert lm(cell="gru").options(temperature=0).temperature == 0.0
    assert lm().prompts == ("time traveller",) and lm(prefixes=()).prompts == ("\n",)


@pytest.mark.parametrize("changes, fragment", [
    ({"beam": 2, "temperature": 1.0}, "beam search is deterministic"),
    ({"beam": 2, "top_k": 3}, "--top-k"),
    ({"beam": 2, "num_samples": 3}, "more than the 2 beams"),
    ({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p"), ({"top_k": -1}, "--top-k"),
    ({"num_samples": 0}, "--num-samples"), ({"stop": ("",)}, "stop text is empty"),
    ({"prefix": ""}, "prompt is empty"), ({"temperature": float("nan")}, "--temperature"),
])
def test_bad_options_are_one_clear_error(changes, fragment):
    with pytest.raises(RnnlabError, match=fragment):
        lm().options(GenerateConfig(), **changes)


def test_stop_texts_the_vocabulary_cannot_write_are_found():
    assert lm().unreachable(("\n", "the", ".")) == ["\n", "."]


# --- the command line, on a tiny trained model ------------------------------------------------------------

TINY = ["--num-hiddens", "16", "--num-epochs", "2", "--max-tokens", "3000", "--backend", "numpy",
        "--prefixes", "time traveller", "the", "--quiet"]


@pytest.fixture(scope="module")
def book_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "book"
    code, _, err = run_cli("train", *TINY, "--out", out)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def gru_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "gru"
    code, _, err = run_cli("train", *TINY, "--cell", "gru", "--out", out)
    assert code == 0, err
    return out


def generate(run, *argv):
    code, out, err = run_cli("generate", "--checkpoint", run, "--backend", "numpy", *argv)
    assert code == 0, err
    return out, err


def test_without_a_prompt_each_of_the_runs_own_prompts_is_continued(book_run):
    result = json.loads(generate(book_run, "--json", "--num-chars", "10")[0])
    assert [p["prompt"] for p in result["prompts"]] == ["time traveller", "the"]
    assert result["temperature"] == 0.0 and len(result["samples"]) == 2
    assert result["samples"][0].startswith("time traveller") and len(result["samples"][0]) == 24
    out, _ = generate(book_run, "--num-chars", "10")
    assert out.count("--- 'time traveller', sample 1 of 1 ---") == 1 and out.count("--- 'the', sample") == 1


def test_a_single_continuation_prints_just_its_text(book_run):
    out, _ = generate(book_run, "--prompt", "time", "--num-chars", "10")
    assert out.endswith("\n") and out.count("\n") == 1 and out.startswith("time") and len(out) == 15


def test_other_models_sample_by_default_and_the_seed_reproduces_them(gru_run):
    a = json.loads(generate(gru_run, "--json", "--prompt", "the", "--num-samples", "4")[0])
    b = json.loads(generate(gru_run, "--json", "--prompt", "the", "--num-samples", "4")[0])
    c = json.loads(generate(gru_run, "--json", "--prompt", "the", "--num-samples", "2", "--seed", "0")[0])
    assert a["temperature"] == SAMPLING_TEMPERATURE and a["samples"] == b["samples"]
    assert c["samples"] == a["samples"][:2] and len(set(a["samples"])) == 4


def test_streaming_prints_the_same_text_as_the_whole(gru_run):
    argv = ("--prompt", "the", "--num-samples", "3", "--num-chars", "30", "--top-k", "5", "--top-p", "0.9")
    whole, _ = generate(gru_run, *argv)
    streamed, _ = generate(gru_run, *argv, "--stream")
    assert streamed.split() == whole.split() and whole.count("sample") == 3


def test_stop_texts_and_beam_search_on_the_command_line(book_run):
    free = json.loads(generate(book_run, "--json", "--prompt", "the", "--num-chars", "40")[0])["samples"][0]
    cut = free[3:].find(" ") + 3
    stopped = json.loads(generate(book_run, "--json", "--prompt", "the", "--num-chars", "40", "--stop",
                                  " ", "zzz")[0])["samples"][0]
    assert stopped == free[:cut]
    beams = json.loads(generate(book_run, "--json", "--prompt", "the", "--beam", "4", "--num-samples", "2")[0])
    assert len(beams["samples"]) == 2 and beams["beam"] == 4


def test_generate_notes_unknown_characters_and_unreachable_stops(tmp_path):
    text = tmp_path / "mini.txt"
    text.write_text("Abc abc cab. " * 300, encoding="utf-8")
    out = tmp_path / "run"
    code, _, err = run_cli("train", "--corpus", text, "--num-epochs", "1", "--num-hiddens", "8", "--embed-size",
                           "4", "--backend", "numpy", "--time-budget", "0", "--quiet", "--out", out)
    assert code == 0, err
    stdout, err = generate(out, "--prompt", "Abé", "--num-chars", "5", "--stop", "\n", "--json")
    assert "'é' x1" in err and "reads them as <unk>" in err and "'\\n'" in err
    assert json.loads(stdout)["samples"][0].startswith("Abé")


@pytest.mark.parametrize("argv, fragment", [
    (["--beam", "2", "--temperature", "1"], "beam search is deterministic"),
    (["--stream", "--json"], "give one"),
    (["--top-p", "0"], "--top-p"),
    (["--num-samples", "0"], "--num-samples"),
])
def test_bad_generate_flags_are_one_line(book_run, argv, fragment):
    code, out, err = run_cli("generate", "--checkpoint", book_run, "--backend", "numpy", *argv)
    one_line_error(code, err, fragment, exit_code=1)

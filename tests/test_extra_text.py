"""--extra-text: more training text before the corpus's own training split, the held-out split unchanged."""
import json

import pytest

from rnnlab import cli, text
from rnnlab.config import DataConfig
from rnnlab.errors import RnnlabError
from rnnlab.runstate import LEAK_WINDOW, load_dataset

from test_cli import assert_one_line_error, read_metrics, run, tiny, weights_files

CORPUS = "the time machine is a story of a man who goes far into the future and back again. " * 30
EXTRA = "zebras quietly fly over jagged mountains while the martians wait. " * 20


@pytest.fixture
def texts(tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    (tmp_path / "extra.txt").write_text(EXTRA)
    return tmp_path / "corpus.txt", tmp_path / "extra.txt"


def data(corpus, *extra, **changes) -> DataConfig:
    return DataConfig(**{"corpus": str(corpus), "preprocess": "letters", "max_tokens": 0,
                         "extra_text": tuple(map(str, extra)), **changes})


def letters(raw: str) -> str:
    """`raw` as --preprocess letters reads it."""
    tokens, vocab = text.load_corpus(raw, "letters")
    return "".join(vocab.to_tokens([int(t) for t in tokens]))


def text_of(ds, tokens) -> str:
    return "".join(ds.vocab.to_tokens([int(t) for t in tokens]))


def test_extra_text_goes_before_the_training_split_and_leaves_the_held_out_split(texts):
    corpus, extra = texts
    alone, both = load_dataset(data(corpus)), load_dataset(data(corpus, extra))
    assert text_of(both, both.val) == text_of(alone, alone.val)
    extra_alone = letters(EXTRA)
    assert text_of(both, both.train) == extra_alone + text_of(alone, alone.train)
    assert both.extra_tokens == len(extra_alone)
    assert "z" in both.vocab.token_to_idx and "z" not in alone.vocab.token_to_idx      # one vocabulary
    assert both.extra_sha256 != () and alone.extra_sha256 == ()
    assert text_of(both, both.own_train) == text_of(alone, alone.train) and alone.extra_tokens == 0
    cut = load_dataset(data(corpus, extra, max_tokens=50))            # --max-tokens: the corpus only
    assert text_of(cut, cut.train) == extra_alone + text_of(alone, alone.train[:50])


def test_extra_text_holding_the_held_out_text_is_refused(texts, tmp_path):
    corpus, extra = texts
    with pytest.raises(RnnlabError, match="is the corpus itself"):
        load_dataset(data(corpus, corpus))
    held_out = text_of(load_dataset(data(corpus)), load_dataset(data(corpus)).val)
    middle = held_out[len(held_out) // 2 - LEAK_WINDOW // 2:][:LEAK_WINDOW]
    leaky = tmp_path / "leaky.txt"
    leaky.write_text(EXTRA + middle + EXTRA)
    with pytest.raises(RnnlabError, match="contains the corpus's held-out text"):
        load_dataset(data(corpus, extra, leaky))
    leaky.write_text(EXTRA + middle[:-1] + EXTRA)                   # one token short of a window: accepted
    load_dataset(data(corpus, extra, leaky))


def test_a_run_with_extra_text_records_it_resumes_exactly_and_refuses_a_changed_file(capsys, tmp_path, texts):
    corpus, extra = texts
    argv = [*tiny(num_epochs=2, max_tokens=0), "--corpus", corpus, "--preprocess", "letters",
            "--extra-text", extra, "--schedule", "constant"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(capsys, "train", *argv, "--out", straight)[0] == 0
    meta = json.loads((straight / "checkpoint.json").read_text())
    assert meta["config"]["data"]["extra_text"] == [str(extra)] and len(meta["extra_text_sha256"]) == 1
    assert meta["train_tokens"] == len(load_dataset(data(corpus, extra)).train)
    prompts = meta["config"]["train"]["prefixes"]                 # taken from the corpus, not the extra text
    assert prompts and all(p in letters(CORPUS) for p in prompts)
    assert not any(p in letters(EXTRA) for p in prompts)
    assert run(capsys, "train", *argv, "--num-epochs", "1", "--out", split)[0] == 0
    code, _, err = run(capsys, "train", "--out", split, "--resume", "--num-epochs", "2", "--quiet")
    assert code == 0, err
    assert [r["val_ppl"] for r in read_metrics(straight)] == [r["val_ppl"] for r in read_metrics(split)]
    assert weights_files(straight)[-1].read_bytes() == weights_files(split)[-1].read_bytes()
    extra.write_text(EXTRA + "more. ")
    code, _, err = run(capsys, "train", "--out", split, "--resume", "--num-epochs", "3", "--quiet")
    assert_one_line_error(code, err, "--extra-text", str(extra), "is not the text")


def test_baseline_and_mixture_fit_the_ngram_on_everything_the_model_trained_on(capsys, tmp_path, texts):
    corpus, extra = texts
    out = tmp_path / "run"
    assert run(capsys, "train", *tiny(max_tokens=0), "--corpus", corpus, "--preprocess", "letters",
               "--extra-text", extra, "--out", out)[0] == 0
    expected = len(load_dataset(data(corpus, extra)).train)
    code, text, _ = run(capsys, "baseline", "--checkpoint", out, "--order", "3", "--json")
    assert code == 0 and json.loads(text)["train_tokens"] == expected
    code, text, _ = run(capsys, "baseline", "--checkpoint", out, "--order", "3", "--json", "--corpus", corpus)
    assert code == 0 and json.loads(text)["train_tokens"] == len(load_dataset(data(corpus)).train)
    code, text, _ = run(capsys, "eval", "--checkpoint", out, "--split", "train", "--json")
    assert code == 0 and json.loads(text)["tokens"] == expected - 1


@pytest.mark.parametrize("flags, fragment", [
    (["--preprocess", "legacy"], "--preprocess legacy"),
    (["--extra-text", "no-such-file.txt"], "no-such-file.txt"),
])
def test_bad_extra_text_is_one_line(capsys, tmp_path, texts, flags, fragment):
    corpus, extra = texts
    argv = [*tiny(), "--corpus", corpus, "--extra-text", extra, *flags, "--out", tmp_path / "run"]
    code, _, err = run(capsys, "train", *argv)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_extra_text_with_a_prepared_text_is_one_line(capsys, tmp_path, texts):
    corpus, extra = texts
    prepared = tmp_path / "prepared"
    assert run(capsys, "prepare", corpus, "--out", prepared, "--quiet")[0] == 0
    code, _, err = run(capsys, "train", *tiny(), "--data", prepared, "--extra-text", extra,
                       "--out", tmp_path / "run")
    assert_one_line_error(code, err, "--extra-text", "prepared")


def test_the_flag_takes_several_texts():
    ns = cli.build_parser().parse_args(["train", "--extra-text", "a.txt", "b.txt"])
    assert cli.given(ns, DataConfig)["extra_text"] == ("a.txt", "b.txt")


def test_a_short_held_out_split_is_compared_by_hash_only(texts):
    corpus, extra = texts
    short = load_dataset(data(corpus, extra, val_fraction=0.01))      # fewer held-out tokens than the window
    assert 2 <= len(short.val) < LEAK_WINDOW


def test_the_vocabulary_holds_only_tokens_of_the_texts(tmp_path):
    (tmp_path / "a.txt").write_text("abab abab")
    (tmp_path / "b.txt").write_text("cdcd")
    both = load_dataset(data(tmp_path / "a.txt", tmp_path / "b.txt", preprocess="raw", val_fraction=0.3))
    assert set(both.vocab.idx_to_token) == {"<unk>", "a", "b", " ", "c", "d"}


def test_unknown_tokens_of_an_extra_text_are_named_with_it(capsys, tmp_path, texts):
    corpus, extra = texts
    source, odd = tmp_path / "source", tmp_path / "odd.txt"
    odd.write_text("QQQ XYZ jagged! " * 50)
    assert run(capsys, "train", *tiny(max_tokens=0), "--corpus", corpus, "--preprocess", "raw",
               "--out", source)[0] == 0
    code, _, err = run(capsys, "train", "--init-from", source, "--extra-text", odd, "--quiet",
                       "--out", tmp_path / "tuned")
    line = assert_one_line_error(code, err, str(odd), "not in the vocabulary", "'Q' x150")
    assert str(corpus) not in line


def test_a_moved_extra_text_is_given_again_on_resuming_and_the_held_out_split_needs_none(capsys, tmp_path,
                                                                                        texts):
    corpus, extra = texts
    out = tmp_path / "run"
    argv = [*tiny(num_epochs=1, max_tokens=0), "--corpus", corpus, "--preprocess", "letters",
            "--extra-text", extra, "--schedule", "constant", "--out", out]
    assert run(capsys, "train", *argv)[0] == 0
    moved = tmp_path / "elsewhere.txt"
    extra.rename(moved)
    code, text_out, err = run(capsys, "eval", "--checkpoint", out, "--json")      # the held-out split
    assert code == 0, err
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--num-epochs", "2", "--quiet")
    assert_one_line_error(code, err, "--extra-text", str(extra))
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--num-epochs", "2", "--quiet",
                       "--extra-text", moved)
    assert code == 0, err
    (tmp_path / "other.txt").write_text(EXTRA.upper())
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--num-epochs", "3", "--quiet",
                       "--extra-text", tmp_path / "other.txt")
    assert_one_line_error(code, err, "other.txt", "is not the text")


@pytest.mark.parametrize("same_corpus", [True, False])
def test_init_from_keeps_the_extra_text_on_the_same_corpus_only(capsys, tmp_path, texts, same_corpus):
    corpus, extra = texts
    source, tuned = tmp_path / "source", tmp_path / "tuned"
    assert run(capsys, "train", *tiny(max_tokens=0), "--corpus", corpus, "--preprocess", "letters",
               "--extra-text", extra, "--out", source)[0] == 0
    assert run(capsys, "train", "--init-from", source, "--corpus", corpus if same_corpus else extra,
               "--num-epochs", "1", "--quiet", "--out", tuned)[0] == 0
    meta = json.loads((tuned / "checkpoint.json").read_text())
    assert meta["config"]["data"]["extra_text"] == ([str(extra)] if same_corpus else [])
    assert len(meta.get("extra_text_sha256", [])) == int(same_corpus)

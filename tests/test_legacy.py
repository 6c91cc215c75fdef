"""The early MXNet notebook's run (seed 000): its text, its 44-symbol vocabulary, its two iterators, the
sampling cadence, and `--preset legacy` from the command line."""
import json

import numpy as np
import pytest

from rnnlab import cli, runstate, samplers, text
from rnnlab.config import DataConfig, TrainConfig, resets_state

from conftest import DATA

# <unk>, then by count over the first 10,000 characters, ties in code-point order (d2l-en, April 2019)
LEGACY_VOCAB = ["<unk>", " ", "e", "t", "a", "i", "o", "n", "s", "r", "h", "l", "d", "m", "c", "u", "y", "f", "g",
                "'", ",", "w", "b", "p", "v", ".", "k", "-", "x", "_", "?", "j", "!", ";", "q", "z", "(", ")", "8",
                ":", "1", "9", "[", "]"]


def test_legacy_text_lowercases_collapses_whitespace_and_keeps_punctuation():
    raw = "The Time Machine,\r\n\r\n  by H. G. Wells [1898]\n\n\tI\n"
    assert text.preprocess(raw, "legacy") == "the time machine, by h. g. wells [1898] i"
    assert text.preprocess(raw, "legacy", "word") == "the time machine, by h. g. wells [1898] i"
    assert text.normalize_prefix("Time  Traveller\n", "legacy") == "time traveller "   # a trailing space stays


def test_legacy_vocab_breaks_ties_in_code_point_order():
    vocab = text.legacy_vocab("cbaabcz")
    assert vocab.idx_to_token == ["<unk>", "a", "b", "c", "z"]
    assert text.Vocab("cbaabcz").idx_to_token == ["<unk>", "c", "b", "a", "z"]    # the book's: first seen


def test_the_legacy_corpus_and_its_44_symbols():
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")
    ds = runstate.load_dataset(DataConfig(preprocess="legacy"))
    assert ds.vocab.idx_to_token == LEGACY_VOCAB
    assert len(ds.train) == 10000 and len(ds.val) == 17860
    assert text.decode(ds.train[:48], ds.vocab) == "the time machine, by h. g. wells [1898] i the tim"[:48]
    legacy_text = text.preprocess((DATA / "timemachine.txt").read_text(), "legacy")
    assert len(legacy_text) == 178605 and '"' in legacy_text and '"' not in ds.vocab.token_to_idx
    assert text.decode(ds.val, ds.vocab) == legacy_text[-17860:]     # the held-out split: the last 10%


@pytest.mark.parametrize("seed", range(20))
def test_legacy_random_windows(seed):
    N, B, T = 203, 4, 7
    corpus = np.arange(N)
    rng = np.random.default_rng(seed)
    offset_rng = np.random.default_rng(seed)
    offset = int(offset_rng.integers(0, T))                    # the first draw of the epoch is the offset
    batches = list(samplers.batches(corpus, B, T, "legacy-random", rng))
    num_examples = (N - offset - 1) // T - 1                   # one window fewer than fit
    assert len(batches) == num_examples // B
    starts = np.concatenate([X[:, 0] for X, _ in batches])
    assert len(set(starts)) == len(starts) and set(starts) <= set(range(offset, offset + num_examples * T, T))
    for X, Y in batches:
        np.testing.assert_array_equal(Y, X + 1)


@pytest.mark.parametrize("seed", range(20))
def test_legacy_consecutive_rows(seed):
    N, B, T = 203, 4, 7
    corpus = np.arange(N)
    offset = int(np.random.default_rng(seed).integers(0, T))
    batches = list(samplers.batches(corpus, B, T, "legacy-consecutive", np.random.default_rng(seed)))
    row_len = (N - offset) // B
    assert len(batches) == (row_len - 1) // T
    np.testing.assert_array_equal(batches[0][0][:, 0], offset + row_len * np.arange(B))
    for (X0, _), (X1, _) in zip(batches, batches[1:]):
        np.testing.assert_array_equal(X1[:, 0], X0[:, -1] + 1)  # each row continues where it stopped
    for X, Y in batches:
        np.testing.assert_array_equal(Y, X + 1)


def test_legacy_offsets_never_reach_num_steps():
    T = 5
    seen = {int(next(iter(samplers.batches(np.arange(200), 2, T, s, np.random.default_rng(k))))[0][0, 0]) % T
            for s in ("legacy-random", "legacy-consecutive") for k in range(200)}
    assert seen <= set(range(T))


def test_state_resets_with_legacy_random_and_carries_with_legacy_consecutive():
    assert resets_state(TrainConfig(sampling="legacy-random"))
    assert not resets_state(TrainConfig(sampling="legacy-consecutive"))


def test_preset_legacy_from_the_command_line(capsys, tmp_path):
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")
    out = tmp_path / "legacy"
    argv = ["train", "--preset", "legacy", "--num-hiddens", "16", "--num-epochs", "3", "--log-every", "1",
            "--sample-every", "2", "--backend", "numpy", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "vocab 44" in err
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["config"]["train"]["num_steps"] == 64 and meta["config"]["train"]["sampling"] == "legacy-random"
    assert meta["vocab"] == LEGACY_VOCAB
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [bool(r["samples"]) for r in records] == [False, True, True]     # every 2 epochs, and the last
    assert set(records[1]["samples"]) == {"traveller", "time traveller"}
    assert cli.main(["generate", "--checkpoint", str(out), "--prefix", "Time  Traveller", "--num-chars", "5"]) == 0
    assert capsys.readouterr().out.startswith("time traveller")


def test_preset_concise_trains_the_framework_layer_from_the_command_line(capsys, tmp_path):
    """The notebook's concise model: torch.nn's RNN (the nn cell variant) on the legacy text, its settings."""
    pytest.importorskip("torch")
    if not (DATA / "timemachine.txt").is_file():
        pytest.skip(f"corpora not found at {DATA}")
    out = tmp_path / "concise"
    argv = ["train", "--preset", "concise", "--num-hiddens", "16", "--num-epochs", "2", "--log-every", "1",
            "--device", "cpu", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "backend torch-nn" in capsys.readouterr().err
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["backend"] == "torch-nn" and meta["config"]["model"]["cell_variant"] == "nn"
    assert (meta["config"]["train"]["lr"], meta["config"]["train"]["theta"]) == (100.0, 0.01)
    assert meta["config"]["train"]["sampling"] == "legacy-consecutive" and meta["vocab"] == LEGACY_VOCAB
    # the same run's checkpoint scores on the reference backend, and the book's cells refuse the nn path
    assert cli.main(["eval", "--checkpoint", str(out), "--backend", "numpy"]) == 0
    capsys.readouterr()
    code = cli.main(["train", "--torch-impl", "nn", "--num-hiddens", "8", "--out", str(tmp_path / "book")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "--cell-variant nn" in err and "fused, autograd, compile" in err
    assert not (tmp_path / "book").exists()

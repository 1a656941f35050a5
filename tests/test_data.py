"""Byte tokenizer, token sources, deterministic batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from disttrain.data import DataError, build_batches, decode, encode
from disttrain.data.sources import Batches, synthetic_tokens, text_tokens, token_file
from disttrain.data.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE


@pytest.mark.parametrize("text", ["", "hello", "naïve — 日本語 🚀", "a\nb\tc\x00"])
def test_byte_tokenizer_round_trip(text):
    ids = encode(text, bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert decode(ids) == text
    assert len(ids) == len(text.encode("utf-8")) + 2


def test_bundled_corpus_and_directory(tmp_path):
    stream = text_tokens(None)
    assert len(stream) > 5000 and stream.max() < VOCAB_SIZE
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "b.txt").write_text("second")
    ids = text_tokens(tmp_path)
    assert decode(ids) == "first docsecond" and (ids == EOS_ID).sum() == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="data.path: no \\*.txt files"):
        text_tokens(empty)


def test_token_files(tmp_path):
    arr = np.arange(1000, dtype=np.int64) % 50
    np.save(tmp_path / "t.npy", arr)
    arr.astype(np.uint16).tofile(tmp_path / "t.bin")
    for name in ("t.npy", "t.bin"):
        loaded = token_file(tmp_path / name, vocab_size=50)
        assert np.array_equal(np.asarray(loaded), arr)
    with pytest.raises(DataError, match="token id 49 >= model.vocab_size \\(10\\)"):
        token_file(tmp_path / "t.npy", vocab_size=10)
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(DataError, match="must end in .npy or .bin"):
        token_file(tmp_path / "t.txt", vocab_size=50)


def test_batches_are_a_function_of_seed_step_micro_rank():
    b1 = build_batches("text", None, vocab_size=259, seq_len=32, micro_batch_size=3, seed=5)
    b2 = build_batches("text", None, vocab_size=259, seq_len=32, micro_batch_size=3, seed=5)
    x, y = b1.get(7, 1, 0)
    assert x.shape == y.shape == (3, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, b2.get(7, 1, 0)[0])
    assert not torch.equal(x, b1.get(8, 1, 0)[0])
    assert not torch.equal(x, b1.get(7, 0, 0)[0])
    assert not torch.equal(x, b1.get(7, 1, 1)[0])


def test_synthetic_is_learnable_and_seeded():
    a = synthetic_tokens(100, 5000, seed=1)
    assert np.array_equal(a, synthetic_tokens(100, 5000, seed=1))
    assert not np.array_equal(a, synthetic_tokens(100, 5000, seed=2))
    assert len(a) == 5000 and a.max() < 100
    # few distinct bigrams compared with uniform random tokens: there is structure to learn
    bigrams = len(set(zip(a[:-1].tolist(), a[1:].tolist())))
    assert bigrams < 0.5 * len(a)


def test_too_little_data():
    with pytest.raises(DataError, match="fewer than train.seq_len"):
        Batches(np.arange(10), seq_len=64, micro_batch_size=1, seed=0)

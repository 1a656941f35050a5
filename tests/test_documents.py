"""data.kind: documents — reading, tokenizing once into a cache, packing with boundaries."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from conftest import ROOT, run_cli
from disttrain.data import DataError, encode
from disttrain.data import documents as documents_module
from disttrain.data.documents import tokenize_documents
from disttrain.data.packing import IGNORE, DocumentBatches, split_documents

TEXTS = ["hello world", "a", "the quick brown fox jumps over the lazy dog",
         "lorem ipsum dolor sit amet", "x" * 70]


def _jsonl(path, texts=TEXTS, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def _docs(tmp_path, **kw):
    path = tmp_path / "d.jsonl"
    if not path.exists():
        _jsonl(path)
    return tokenize_documents(path, cache_dir=tmp_path / "cache", progress=False, **kw)


def test_byte_tokenizer_appends_eos_and_the_cache_is_reused(tmp_path, monkeypatch):
    docs = _docs(tmp_path)
    assert docs.num_documents == len(TEXTS)
    for i, text in enumerate(TEXTS):
        got = docs.tokens[docs.offsets[i]:docs.offsets[i + 1]].tolist()
        assert got == encode(text, eos=True)
    writes = []
    monkeypatch.setattr(documents_module, "_write_cache",
                        lambda *a, **k: writes.append(a))
    again = _docs(tmp_path)
    assert writes == [] and again.directory == docs.directory
    _jsonl(tmp_path / "d.jsonl", TEXTS[:2])  # new bytes, new key
    with pytest.raises(FileNotFoundError):  # the stubbed writer wrote nothing
        _docs(tmp_path)
    assert len(writes) == 1


def test_parquet_saved_dataset_and_ids_field_agree_with_jsonl(tmp_path):
    import datasets

    ref = _docs(tmp_path)
    table = datasets.Dataset.from_dict({"text": TEXTS})
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "d.parquet", tmp_path / "saved"):
        got = tokenize_documents(path, cache_dir=tmp_path / "cache", progress=False)
        assert got.tokens.tolist() == ref.tokens.tolist(), path.name
    ids = [encode(t, eos=True) for t in TEXTS]
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps({"ids": x}) + "\n" for x in ids))
    got = tokenize_documents(tmp_path / "ids.jsonl", ids_field="ids",
                             cache_dir=tmp_path / "cache", progress=False)
    assert got.tokens.tolist() == ref.tokens.tolist()


def _word_tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "<pad>": 2}
    for text in TEXTS:
        for word in text.split():
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory = tmp_path / "tok"
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad>"}))
    return directory, tok


def test_hf_tokenizer_dir_is_used_with_its_eos(tmp_path):
    directory, tok = _word_tokenizer_dir(tmp_path)
    docs = _docs(tmp_path, tokenizer_dir=directory)
    assert docs.eos_id == 1 and docs.pad_id == 2
    for i, text in enumerate(TEXTS):
        got = docs.tokens[docs.offsets[i]:docs.offsets[i + 1]].tolist()
        assert got == tok.encode(text).ids + [1]
    with pytest.raises(DataError, match="model.vocab_size"):
        _docs(tmp_path, tokenizer_dir=directory, vocab_size=3)


def test_bad_inputs_name_the_field(tmp_path):
    with pytest.raises(DataError, match="data.text_field: 'body'"):
        _docs(tmp_path, text_field="body")
    (tmp_path / "empty_tok").mkdir()
    with pytest.raises(DataError, match="data.tokenizer: .* no tokenizer files"):
        _docs(tmp_path, tokenizer_dir=tmp_path / "empty_tok")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="data.path: .* line 2"):
        tokenize_documents(tmp_path / "bad.jsonl", cache_dir=tmp_path / "cache", progress=False)
    (tmp_path / "x.csv").write_text("text\nhi\n")
    with pytest.raises(DataError, match="data.path: documents must be"):
        tokenize_documents(tmp_path / "x.csv", cache_dir=tmp_path / "cache", progress=False)


def test_concurrent_tokenizers_share_one_cache(tmp_path):
    """Two workers at once (as two ranks would): one tokenizes, the other waits and reuses."""
    path = _jsonl(tmp_path / "d.jsonl")
    calls, results = [], []
    real = documents_module._write_cache

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    documents_module._write_cache = counting
    try:
        threads = [threading.Thread(target=lambda: results.append(tokenize_documents(
            path, cache_dir=tmp_path / "cache", progress=False))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        documents_module._write_cache = real
    assert len(results) == 2 and len(calls) == 1
    assert results[0].directory == results[1].directory
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]
    assert leftovers == []


@pytest.mark.parametrize("pad", [0, 8])
def test_packing_keeps_boundaries_and_labels_within_documents(tmp_path, pad):
    docs = _docs(tmp_path)
    batches = DocumentBatches(docs, seq_len=16, micro_batch_size=2, global_batch_size=4,
                              seed=3, pad_to_multiple_of=pad)
    seen_pad = False
    for step in range(5):  # more than one epoch
        for micro in range(2):
            b = batches.get_packed(step, micro)
            tokens, targets, pos = b.tokens[0], b.targets[0], b.positions
            ids = b.doc_ids[0]
            assert tokens.shape == (32,) and pos.shape == (32,)
            for i in range(32):
                first = i == 0 or ids[i] != ids[i - 1]
                assert (pos[i] == 0) == bool(first), (step, micro, i)
                if targets[i] != IGNORE:  # a label is the next token of the same piece
                    assert i + 1 < 32 and ids[i + 1] == ids[i] and targets[i] == tokens[i + 1]
                if i + 1 == 32 or ids[i + 1] != ids[i]:
                    assert targets[i] == IGNORE  # the last token of a piece predicts nothing
            assert not (ids[:16].unique()[:, None] == ids[16:].unique()[None]).any()
            seen_pad |= bool((tokens == docs.pad_id).any())
    assert seen_pad == bool(pad)


def test_data_order_depends_on_the_step_only(tmp_path):
    """Rows of a step are the same whatever micro_batch_size splits them (dp, accumulation)."""
    docs = _docs(tmp_path)
    one = DocumentBatches(docs, seq_len=16, micro_batch_size=1, global_batch_size=4, seed=3)
    two = DocumentBatches(docs, seq_len=16, micro_batch_size=2, global_batch_size=4, seed=3)
    for step in (0, 7):
        rows_one = np.concatenate([one.get_packed(step, g).tokens[0].numpy() for g in range(4)])
        rows_two = np.concatenate([two.get_packed(step, g).tokens[0].numpy() for g in range(2)])
        assert (rows_one == rows_two).all()
    assert not (one.get_packed(0, 0).tokens == one.get_packed(1, 0).tokens).all()


def test_attention_fraction_sums_document_squares(tmp_path):
    docs = _docs(tmp_path)
    batches = DocumentBatches(docs, seq_len=16, micro_batch_size=1, global_batch_size=1, seed=0)
    want = np.mean([float((np.bincount(batches.row(r)[3]) ** 2).sum()) / 256
                    for r in range(batches.rows_per_epoch)])
    assert batches.attention_fraction() == pytest.approx(want)
    assert 0 < batches.attention_fraction() < 1
    train, valid = split_documents(10, 0.2, seed=0)
    assert len(valid) == 2 and sorted([*train, *valid]) == list(range(10))


def test_cli_exits_2_naming_a_missing_text_field(write_spec, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", field="body")
    spec = write_spec({"train": {"seq_len": 16, "steps": 1, "warmup_steps": 0},
                       "data": {"kind": "documents", "path": str(data),
                                "cache_dir": str(tmp_path / "cache")}})
    result = run_cli("train", spec)
    assert result.returncode == 2, result.stderr
    assert "data.text_field: 'text' is not a field" in result.stderr
    assert "Traceback" not in result.stderr


def test_bundled_example_corpus_matches_its_script(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "corpus.jsonl"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_corpus.py"), str(out)],
                   check=True, capture_output=True)
    assert out.read_text() == (ROOT / "examples" / "data" / "corpus.jsonl").read_text()


def test_spec_fields_and_the_planners_attention_fraction(tmp_path):
    from conftest import TINY_JOB, merge
    from disttrain.data.packing import build_document_batches
    from disttrain.spec import SpecError, job_from_dict

    path = _jsonl(tmp_path / "d.jsonl")
    spec = merge(TINY_JOB, {"train": {"seq_len": 16},
                            "data": {"kind": "documents", "path": str(path),
                                     "cache_dir": str(tmp_path / "cache")}})
    job = job_from_dict(spec)
    train, valid = build_document_batches(job, progress=False)
    assert valid is None
    fraction = job.plan_request().attention_fraction
    assert fraction == pytest.approx(train.attention_fraction()) and 0 < fraction < 1
    assert job_from_dict(TINY_JOB).plan_request().attention_fraction is None  # one doc/row
    bad = {"train.eval_every": {"train": {"eval_every": 2}},
           "data.pad_to_multiple_of": {"data": {"kind": "text", "pad_to_multiple_of": 8,
                                                "cache_dir": None, "path": None}},
           "data.tokenizer: not used with data.ids_field": {
               "data": {"ids_field": "ids", "tokenizer": str(tmp_path)}},
           "data.valid_fraction": {"data": {"valid_fraction": 1.5}}}
    for field, change in bad.items():
        with pytest.raises(SpecError, match=field.replace(".", r"\.")):
            job_from_dict(merge(spec, change))


@pytest.mark.slow  # importing transformers takes ~20 s here
def test_transformers_autotokenizer_path_without_tokenizer_json(tmp_path):
    """A directory with only slow-tokenizer files (vocab.json + merges.txt) goes through
    transformers.AutoTokenizer (local files only); its EOS ends each document."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    directory = tmp_path / "bpe"
    directory.mkdir()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=300, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(directory))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>"}))
    assert not (directory / "tokenizer.json").exists()
    docs = _docs(tmp_path, tokenizer_dir=directory)
    ref = GPT2TokenizerFast(vocab_file=str(directory / "vocab.json"),
                            merges_file=str(directory / "merges.txt"))
    eos = ref.convert_tokens_to_ids("<|endoftext|>")
    assert docs.eos_id == eos
    for i, text in enumerate(TEXTS):
        got = docs.tokens[docs.offsets[i]:docs.offsets[i + 1]].tolist()
        assert got == ref.encode(text) + [eos]


def test_tokenizer_defaults_to_the_model_hf_directory(tmp_path):
    """data.tokenizer unset: model.hf's directory (read defensively: the field is another
    part of issue 13), refused with a field-naming error when it has no tokenizer files."""
    from types import SimpleNamespace

    from disttrain.data.documents import document_tokenizer_dir
    from disttrain.spec import SpecError

    directory, _ = _word_tokenizer_dir(tmp_path)

    def job(hf, tokenizer=None):
        data = SimpleNamespace(ids_field=None, tokenizer=tokenizer)
        return SimpleNamespace(spec=SimpleNamespace(data=data, model=SimpleNamespace(hf=hf)),
                               base_dir=tmp_path)

    assert document_tokenizer_dir(job(str(directory))) == directory
    assert document_tokenizer_dir(job(None)) is None  # byte tokenizer
    assert document_tokenizer_dir(job(None, tokenizer="tok")) == tmp_path / "tok"
    (tmp_path / "weights_only").mkdir()
    with pytest.raises(SpecError, match="data.tokenizer: not set, and model.hf"):
        document_tokenizer_dir(job("weights_only"))

"""Documents: read a local dataset, tokenize it once into a cached memmap, every rank reuses it.

Inputs (`data.path`): a `.jsonl` file, a `.parquet` file, a directory written by
`datasets.Dataset.save_to_disk`, or a directory of `.jsonl` / `.parquet` files. Each record
gives one document: text in `data.text_field` (tokenized) or token ids in `data.ids_field`.

Tokenizer (`data.tokenizer`): a directory with `tokenizer.json` (read with `tokenizers`) or
other Hugging Face tokenizer files (read with `transformers.AutoTokenizer`, local files only);
without one, disttrain's byte tokenizer. The tokenizer's EOS is appended to every document
(unless its post-processor already ends documents with it).

Cache: `<cache_dir>/<key>/{tokens.npy, offsets.npy, meta.json}` where the key hashes the input
files (path, size, mtime), the field, and the tokenizer files' bytes. The first process to
take `<key>.lock` tokenizes into a temporary directory and renames it into place; the others
wait on the lock and then read the finished cache, so concurrent ranks are safe.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from disttrain.data import tokenizer as byte_tokenizer
from disttrain.data.sources import DataError
from disttrain.spec import _resolve

CACHE_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                   "added_tokens.json", "config.json", "generation_config.json")
"""Files of a tokenizer directory that enter the cache key (those present)."""
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
"""A tokenizer directory holds at least one of these."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "disttrain" / "documents"


# -- tokenizers ------------------------------------------------------------------------------

@dataclass
class DocumentTokenizer:
    """Turns texts into token ids, EOS appended."""

    name: str
    eos_id: int | None
    pad_id: int
    fingerprint: str
    """Hash of the tokenizer's files (part of the cache key)."""
    bos_id: int | None = None
    vocab_size: int = 0
    """Token ids the tokenizer can produce (added tokens included)."""
    _encode_batch: object = None

    def encode(self, texts: list[str]) -> list[list[int]]:
        out = self._encode_batch(texts)
        if self.eos_id is None:
            return out
        return [ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id] for ids in out]


def load_tokenizer(directory: Path | None, *, field: str = "data.tokenizer") -> DocumentTokenizer:
    """The tokenizer of `directory` (a Hugging Face tokenizer or model dir; local files only),
    or the byte tokenizer; errors name `field`. `tokenizer.json` is read with the `tokenizers`
    library, a slow tokenizer (tokenizer.model, vocab.json + merges.txt) through
    `transformers.AutoTokenizer`."""
    if directory is None:
        return DocumentTokenizer(
            name="bytes", eos_id=byte_tokenizer.EOS_ID, pad_id=byte_tokenizer.PAD_ID,
            fingerprint="bytes-v1", bos_id=byte_tokenizer.BOS_ID,
            vocab_size=byte_tokenizer.VOCAB_SIZE,
            _encode_batch=lambda texts: [byte_tokenizer.encode(t) for t in texts])
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{field}: {directory} is not a directory")
    if not any((directory / f).is_file() for f in HF_TOKENIZER_FILES):
        raise DataError(f"{field}: {directory} holds no tokenizer files (one of "
                        f"{', '.join(HF_TOKENIZER_FILES)})")
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            digest.update(name.encode() + b"\0" + (directory / name).read_bytes())
    fingerprint = digest.hexdigest()
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        try:
            tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as exc:  # the library raises a bare Exception on bad JSON
            raise DataError(f"{field}: cannot read {directory / 'tokenizer.json'}: "
                            f"{str(exc).splitlines()[0]}") from None
        eos = _special_id(directory, "eos", tok.token_to_id)
        pad = _special_id(directory, "pad", tok.token_to_id)
        return DocumentTokenizer(
            name=str(directory), eos_id=eos, pad_id=pad if pad is not None else (eos or 0),
            fingerprint=fingerprint, bos_id=_special_id(directory, "bos", tok.token_to_id),
            vocab_size=tok.get_vocab_size(with_added_tokens=True),
            _encode_batch=lambda texts: [e.ids for e in tok.encode_batch(texts)])
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"{field}: cannot load {directory}: "
                        f"{str(exc).splitlines()[0]}") from None
    eos, pad = tok.eos_token_id, tok.pad_token_id
    return DocumentTokenizer(
        name=str(directory), eos_id=eos, pad_id=pad if pad is not None else (eos or 0),
        fingerprint=fingerprint, bos_id=tok.bos_token_id, vocab_size=len(tok),
        _encode_batch=lambda texts: tok(texts, add_special_tokens=True)["input_ids"])


def _special_id(directory: Path, kind: str, token_to_id) -> int | None:
    """Id of the `bos` / `eos` / `pad` token named by tokenizer_config.json (or config.json's
    id)."""
    config = directory / "tokenizer_config.json"
    if config.is_file():
        token = json.loads(config.read_text()).get(f"{kind}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and token_to_id(token) is not None:
            return int(token_to_id(token))
    model_config = directory / "config.json"
    if model_config.is_file():
        value = json.loads(model_config.read_text()).get(f"{kind}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return None


def document_tokenizer_dir(job) -> Path | None:
    """data.tokenizer, else model.hf's directory (when the model comes from one), else None
    (byte tokenizer)."""
    data = job.spec.data
    if data.ids_field is not None:
        return None
    if data.tokenizer is not None:
        return _resolve(data.tokenizer, job.base_dir)
    hf = getattr(job.spec.model, "hf", None)  # model.hf: another part of issue 13
    if not hf:
        return None
    directory = _resolve(str(hf), job.base_dir)
    if not any((directory / name).is_file() for name in HF_TOKENIZER_FILES):
        raise DataError(f"data.tokenizer: not set, and model.hf ({directory}) holds no "
                        f"tokenizer files ({', '.join(HF_TOKENIZER_FILES)}); set "
                        f"data.tokenizer to a tokenizer directory")
    return directory


# -- reading records -------------------------------------------------------------------------

def input_files(path: Path) -> list[Path]:
    """The files that make up the dataset at `path` (a saved dataset's arrow files included)."""
    if path.is_file():
        if path.suffix not in (".jsonl", ".parquet"):
            raise DataError(f"data.path: documents must be .jsonl, .parquet or a saved "
                            f"dataset directory, got {path.name}")
        return [path]
    if _is_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".parquet"))
    if not files:
        raise DataError(f"data.path: no .jsonl or .parquet files (nor a saved dataset) "
                        f"under {path}")
    return files


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in
                                 ("state.json", "dataset_dict.json", "dataset_info.json"))


def iter_field(path: Path, field: str, field_name: str) -> Iterator[object]:
    """Values of `field` of every record, in order; `field_name` is the spec path for errors."""
    if _is_saved_dataset(path):
        yield from _saved_dataset_field(path, field, field_name)
        return
    for file in input_files(path):
        try:
            if file.suffix == ".jsonl":
                yield from _jsonl_field(file, field, field_name)
            else:
                yield from _parquet_field(file, field, field_name)
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"data.path: cannot read {file}: {exc}") from None


def _jsonl_field(file: Path, field: str, field_name: str) -> Iterator[object]:
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"data.path: {file} line {number} is not JSON: {exc.msg}") from None
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{field_name}: {field!r} is not a field of {file} line "
                                f"{number} (fields: {keys})")
            yield record[field]


def _parquet_field(file: Path, field: str, field_name: str) -> Iterator[object]:
    import pyarrow.parquet as pq
    try:
        handle = pq.ParquetFile(file)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"data.path: cannot read {file}: {str(exc).splitlines()[0]}") from None
    names = handle.schema_arrow.names
    if field not in names:
        raise DataError(f"{field_name}: {field!r} is not a column of {file} (columns: {names})")
    for batch in handle.iter_batches(columns=[field]):
        yield from batch.column(0).to_pylist()


def _saved_dataset_field(path: Path, field: str, field_name: str) -> Iterator[object]:
    import datasets
    try:
        data = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise DataError(f"data.path: cannot load the saved dataset {path}: "
                        f"{str(exc).splitlines()[0]}") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise DataError(f"data.path: {path} is a DatasetDict without a 'train' split "
                            f"(splits: {list(data)})")
        data = data["train"]
    if field not in data.column_names:
        raise DataError(f"{field_name}: {field!r} is not a column of {path} "
                        f"(columns: {data.column_names})")
    for start in range(0, len(data), 1024):
        yield from data[start:start + 1024][field]


# -- the cache -------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizedDocuments:
    """All documents' token ids back to back, and where each starts."""

    tokens: np.ndarray
    """1-D memmap of token ids (uint32)."""
    offsets: np.ndarray
    """(num_documents + 1,) int64: document i is tokens[offsets[i]:offsets[i+1]]."""
    eos_id: int | None
    pad_id: int
    directory: Path

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def cache_key(path: Path, field: str, tokenizer: DocumentTokenizer | None) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}\0{field}\0".encode())
    digest.update((tokenizer.fingerprint if tokenizer is not None else "ids").encode())
    for file in input_files(path):
        stat = file.stat()
        digest.update(f"\0{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def tokenize_documents(path: Path, *, text_field: str = "text", ids_field: str | None = None,
                       tokenizer_dir: Path | None = None, cache_dir: Path | None = None,
                       vocab_size: int | None = None, progress: bool = True
                       ) -> TokenizedDocuments:
    """Tokenize (once) and memory-map the documents at `path`."""
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    tokenizer = None if ids_field else load_tokenizer(tokenizer_dir)
    field, field_name = (ids_field, "data.ids_field") if ids_field else (text_field,
                                                                          "data.text_field")
    root = cache_dir or default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data.cache_dir: cannot create {root}: {exc.strerror}") from None
    key = cache_key(path, field, tokenizer)
    final = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer; the others wait, then read
        if not (final / "meta.json").is_file():
            _write_cache(final, iter_field(path, field, field_name), tokenizer, field_name,
                         progress=progress)
    docs = _open_cache(final)
    if vocab_size is not None and docs.tokens.size and int(docs.tokens.max()) >= vocab_size:
        where = "data.ids_field" if ids_field else "data.tokenizer"
        raise DataError(f"{where}: token id {int(docs.tokens.max())} >= model.vocab_size "
                        f"({vocab_size}); the tokens do not fit the model")
    return docs


def _write_cache(final: Path, values: Iterator[object], tokenizer: DocumentTokenizer | None,
                 field_name: str, *, progress: bool) -> None:
    from tqdm import tqdm

    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        lengths: list[int] = []
        with open(tmp / "tokens.u32", "wb") as out, \
                tqdm(desc="tokenizing documents", unit=" docs", disable=not progress or None,
                     mininterval=1.0) as bar:
            batch: list = []
            for value in values:
                batch.append(value)
                if len(batch) == 256:
                    _flush(batch, tokenizer, field_name, out, lengths)
                    bar.update(len(batch))
                    batch = []
            _flush(batch, tokenizer, field_name, out, lengths)
            bar.update(len(batch))
            out.flush()
            os.fsync(out.fileno())
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(tmp / "offsets.npy", offsets)
        meta = {"version": CACHE_VERSION, "num_documents": len(lengths),
                "num_tokens": int(offsets[-1]),
                "eos_id": tokenizer.eos_id if tokenizer else None,
                "pad_id": tokenizer.pad_id if tokenizer else 0,
                "tokenizer": tokenizer.name if tokenizer else None}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _flush(batch: list, tokenizer: DocumentTokenizer | None, field_name: str, out,
           lengths: list[int]) -> None:
    if not batch:
        return
    if tokenizer is None:
        docs = []
        for value in batch:
            if not isinstance(value, (list, tuple, np.ndarray)) or not all(
                    isinstance(i, (int, np.integer)) and i >= 0 for i in value):
                raise DataError(f"{field_name}: must hold lists of non-negative token ids, "
                                f"got {str(value)[:40]!r}")
            docs.append(list(value))
    else:
        bad = next((v for v in batch if not isinstance(v, str)), None)
        if bad is not None:
            raise DataError(f"{field_name}: must hold text, got {type(bad).__name__} "
                            f"{str(bad)[:40]!r}")
        docs = tokenizer.encode(batch)
    for ids in docs:
        if ids:
            out.write(np.asarray(ids, dtype=np.uint32).tobytes())
            lengths.append(len(ids))


def _open_cache(directory: Path) -> TokenizedDocuments:
    meta = json.loads((directory / "meta.json").read_text())
    offsets = np.load(directory / "offsets.npy")
    tokens = (np.memmap(directory / "tokens.u32", dtype=np.uint32, mode="r")
              if offsets[-1] else np.zeros(0, dtype=np.uint32))
    if meta["num_documents"] == 0:
        raise DataError(f"data.path: no non-empty documents (cache {directory})")
    return TokenizedDocuments(tokens=tokens, offsets=offsets, eos_id=meta["eos_id"],
                              pad_id=meta["pad_id"], directory=directory)

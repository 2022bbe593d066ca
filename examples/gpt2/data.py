"""Offline training data: the Python standard library's own sources, byte-tokenized and packed.

Nothing is downloaded. Every Python installation ships its standard library as source (`*.py`,
including `pydoc_data/topics.py`, the text of the language reference's help topics) — about 30 MB
of real text written by people, on any machine that runs this example.

- One document per file. Files are split into train / validation by a hash of their path (so the
  split does not depend on the file order), and the training documents are shuffled with a seed.
- `ByteTokenizer`: the 256 byte values plus one `BOS` token that starts every document.
- Packing: the documents, each as `[BOS, bytes...]`, are concatenated into one stream that is cut
  into rows of `seq_len + 1` tokens (inputs are the first `seq_len`, targets the last `seq_len`).
  A row holds pieces of several documents; `segment_ids` number them within the row (a BOS opens a
  new segment), so attention with `q_segment_ids = kv_segment_ids = segment_ids` never crosses a
  document boundary, and `positions` restart at 0 at every BOS (the learned position embedding
  sees where each document starts). The target of a document's last byte is the next BOS: the
  model learns where documents end.
- Short documents (`cut_documents`): most files are long (from Python 3.12's standard library, a
  row of 4096 tokens holds 1.2 documents on average). To measure attention over many segments per
  row, the documents can be cut into pieces of exactly `doc_len = seq_len // N` tokens (each opened
  by a BOS, its positions restarting), so that every row holds N documents.

This module uses numpy only: the benchmark's parent process prepares the data without touching the
accelerator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
import sysconfig
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "lib-dynload"})
_SUFFIXES = (".py", ".txt", ".rst")
_CACHE_VERSION = 1
_MIN_DEFAULT_BYTES = 2 * 2**20
_FALLBACK_BYTES = 64 * 2**20


class ByteTokenizer:
    """Bytes 0..255 are tokens 0..255; `BOS` (256) starts each document. Lossless, no training."""

    BOS: int = 256
    vocab_size: int = 257

    def encode(self, text: str | bytes) -> np.ndarray:
        """`Int[ndarray, "L"]` uint16 token ids of `text` (UTF-8 encoded if a str), without BOS."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, np.uint8).astype(np.uint16)

    def decode(self, tokens: Iterable[int]) -> str:
        """The text of `tokens`; BOS tokens are dropped, invalid UTF-8 is replaced."""
        data = bytes(int(t) for t in tokens if int(t) < 256)
        return data.decode("utf-8", errors="replace")


def default_corpus_root() -> Path:
    """The running Python's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def find_documents(root: Path | None = None) -> list[Path]:
    """The text files under `root` (default: the standard library), sorted by relative path.

    Third-party packages (`site-packages`), bytecode and extension modules are skipped.
    """
    root = Path(root) if root is not None else default_corpus_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            if name.endswith(_SUFFIXES):
                files.append(Path(dirpath) / name)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_validation(relative_path: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: a stable hash of its path (CRC-32)."""
    return (zlib.crc32(relative_path.encode("utf-8")) % 10_000) < val_fraction * 10_000


def pack_documents(docs: Sequence[np.ndarray], bos: int = ByteTokenizer.BOS) -> np.ndarray:
    """`Int[ndarray, "L"]` uint16: the documents' tokens, each preceded by `bos`, concatenated."""
    if not docs:
        return np.zeros((0,), np.uint16)
    parts = []
    for doc in docs:
        parts.append(np.asarray([bos], np.uint16))
        parts.append(np.asarray(doc, np.uint16))
    return np.concatenate(parts)


def doc_len_for(seq_len: int, docs_per_row: int) -> int:
    """The document length (BOS included) at which rows of `seq_len` tokens hold `docs_per_row`
    documents: `seq_len // docs_per_row`, which must be at least 2 (a BOS and one byte)."""
    if docs_per_row < 1 or seq_len // docs_per_row < 2:
        raise ValueError(
            f"docs_per_row must be between 1 and seq_len // 2 = {seq_len // 2}, got {docs_per_row}"
        )
    return seq_len // docs_per_row


def cut_documents(stream: np.ndarray, doc_len: int, bos: int = ByteTokenizer.BOS) -> np.ndarray:
    """The packed `stream` with every document cut into pieces of exactly `doc_len` tokens.

    Each piece is `[bos, doc_len - 1 bytes]`: the first opens with the document's own BOS, the
    others with a new one, so segment ids and positions restart at each piece. A document's last
    piece shorter than `doc_len` (and so a whole document shorter than `doc_len`) is dropped, as are
    tokens before the stream's first BOS. Rows of `seq_len = N * doc_len` tokens cut at stride
    `seq_len` (`BatchSampler`) then hold exactly N documents each; with `doc_len = seq_len // N`
    (`doc_len_for`) and `seq_len` not a multiple of N, N or N + 1.

    Returns:
      `Int[ndarray, "P*doc_len"]` of the stream's dtype: the P pieces, concatenated in order.
    """
    if doc_len < 2:
        raise ValueError(f"doc_len must be at least 2 (a BOS and one byte), got {doc_len}")
    stream = np.asarray(stream)
    width = doc_len - 1
    bodies = []
    for doc in np.split(stream, np.flatnonzero(stream == bos))[1:]:
        body = doc[1:]
        bodies.append(body[: len(body) // width * width].reshape(-1, width))
    pieces = np.concatenate(bodies) if bodies else np.zeros((0, width), stream.dtype)
    bos_column = np.full((len(pieces), 1), bos, stream.dtype)
    return np.concatenate([bos_column, pieces], axis=1).reshape(-1)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token streams of the two splits (`uint16`, documents packed with BOS) and where they came
    from."""

    train: np.ndarray
    val: np.ndarray
    meta: dict


def _read_documents(root: Path, limit: int | None) -> list[tuple[str, bytes]]:
    """(relative path, bytes) of the text files under `root`, until `limit` bytes were read."""
    docs, total = [], 0
    for path in find_documents(root):
        try:
            text = path.read_bytes()
        except OSError:
            continue
        if not text or b"\x00" in text:
            continue
        docs.append((path.relative_to(root).as_posix(), text))
        total += len(text)
        if limit is not None and total >= limit:
            break
    return docs


def build_corpus(
    root: Path | None = None,
    *,
    val_fraction: float = 0.02,
    seed: int = 0,
    max_bytes: int | None = None,
) -> Corpus:
    """Read, split, shuffle and pack the corpus under `root` (default: the standard library).

    Args:
      root: directory of text files; default the running Python's standard library, and, should
        that hold less than 2 MiB of sources (a stripped installation), also the Python files of
        its third-party packages (up to 64 MiB).
      val_fraction: share of documents (by path hash) held out for validation.
      seed: seed of the training documents' order.
      max_bytes: stop reading once this many bytes were read (small corpora for tests).
    """
    roots = [Path(root) if root is not None else default_corpus_root()]
    docs = _read_documents(roots[0], max_bytes)
    if root is None and sum(len(t) for _, t in docs) < _MIN_DEFAULT_BYTES:
        roots.append(Path(sysconfig.get_paths()["purelib"]))
        docs += _read_documents(roots[1], max_bytes or _FALLBACK_BYTES)
    tokenizer = ByteTokenizer()
    train_docs: list[np.ndarray] = []
    val_docs: list[np.ndarray] = []
    for rel, text in docs:
        split = val_docs if is_validation(rel, val_fraction) else train_docs
        split.append(tokenizer.encode(text))
    random.Random(seed).shuffle(train_docs)
    meta = {
        "root": ", ".join(str(r) for r in roots),
        "python": sys.version.split()[0],
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "bytes": sum(len(t) for _, t in docs),
        "val_fraction": val_fraction,
        "seed": seed,
        "tokenizer": "bytes+BOS (257 ids)",
    }
    return Corpus(pack_documents(train_docs), pack_documents(val_docs), meta)


def load_corpus(
    cache_dir: Path | None = None,
    root: Path | None = None,
    *,
    val_fraction: float = 0.02,
    seed: int = 0,
    max_bytes: int | None = None,
) -> Corpus:
    """`build_corpus`, cached as `.npy` files under `cache_dir` (keyed by the arguments and the
    corpus root's Python version), so later runs and benchmark workers load it in milliseconds."""
    root = Path(root) if root is not None else default_corpus_root()
    if cache_dir is None:
        return build_corpus(root, val_fraction=val_fraction, seed=seed, max_bytes=max_bytes)
    key = json.dumps(
        [_CACHE_VERSION, str(root), sys.version, val_fraction, seed, max_bytes], sort_keys=True
    )
    folder = Path(cache_dir) / hashlib.sha1(key.encode()).hexdigest()[:16]
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return Corpus(np.load(folder / "train.npy"), np.load(folder / "val.npy"), meta)
    corpus = build_corpus(root, val_fraction=val_fraction, seed=seed, max_bytes=max_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "train.npy", corpus.train)
    np.save(folder / "val.npy", corpus.val)
    meta_path.write_text(json.dumps(corpus.meta, indent=1))  # Written last: marks completion.
    return corpus


def segments_and_positions(
    tokens: np.ndarray, bos: int = ByteTokenizer.BOS
) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and in-document positions of packed rows.

    Args:
      tokens: `Int[ndarray, "B T"]` rows cut from a packed stream.
      bos: the token that opens each document.

    Returns:
      `segment_ids`, `Int[ndarray, "B T"]` int32: the number of BOS tokens at or before each
      position (0 for the tail of a document that began in an earlier row), and `positions`,
      `Int[ndarray, "B T"]` int32: the distance to the last BOS at or before each position (to the
      row start if there is none).
    """
    tokens = np.asarray(tokens)
    is_bos = tokens == bos
    segment_ids = np.cumsum(is_bos, axis=-1, dtype=np.int32)
    index = np.broadcast_to(np.arange(tokens.shape[-1], dtype=np.int32), tokens.shape)
    starts = np.maximum.accumulate(np.where(is_bos, index, 0), axis=-1)
    return segment_ids, (index - starts).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of packed rows; every array is `Int[ndarray, "*B T"]` int32."""

    inputs: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray

    @property
    def num_tokens(self) -> int:
        """Tokens predicted in this batch."""
        return int(self.targets.size)

    def reshape(self, *shape: int) -> Batch:
        """The same batch with leading dims `shape` (e.g. `(accum, micro_batch)`) before T."""
        return Batch(*(x.reshape(*shape, x.shape[-1]) for x in dataclasses.astuple(self)))


def make_batch(rows: np.ndarray, bos: int = ByteTokenizer.BOS) -> Batch:
    """A `Batch` from `Int[ndarray, "B T+1"]` rows of a packed stream."""
    rows = np.asarray(rows, np.int32)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    segment_ids, positions = segments_and_positions(inputs, bos)
    return Batch(
        np.ascontiguousarray(inputs), np.ascontiguousarray(targets), segment_ids, positions
    )


class BatchSampler:
    """Batches of rows of `seq_len + 1` tokens cut at stride `seq_len` from a packed stream.

    Row order is a fresh permutation per epoch, drawn from `(seed, epoch)`: `batch(step)` depends
    on `step` alone, so a resumed run sees exactly the batches the uninterrupted run would have.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int, seed: int = 0) -> None:
        self.stream = np.asarray(stream)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.num_rows = (len(self.stream) - 1) // seq_len
        if self.num_rows < 1:
            raise ValueError(
                f"the stream has {len(self.stream)} tokens, too few for one row of {seq_len + 1}"
            )
        self._epoch = -1
        self._order = np.zeros((0,), np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order, self._epoch = rng.permutation(self.num_rows), epoch
        return self._order

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """`Int[ndarray, "B T+1"]`: the rows with the given (unpermuted) indices."""
        starts = np.asarray(indices, np.int64)[:, None] * self.seq_len
        return self.stream[starts + np.arange(self.seq_len + 1)]

    def batch(self, step: int) -> Batch:
        """The batch of training step `step` (0-based)."""
        flat = step * self.batch_size + np.arange(self.batch_size)
        epochs, within = np.divmod(flat, self.num_rows)
        indices = np.array(
            [self._permutation(int(e))[int(i)] for e, i in zip(epochs, within, strict=True)]
        )
        return make_batch(self.rows(indices))


def eval_batches(stream: np.ndarray, seq_len: int, batch_size: int, count: int) -> list[Batch]:
    """Up to `count` fixed batches of consecutive rows from the start of `stream` (validation);
    none if the stream is shorter than one batch."""
    if len(stream) < batch_size * seq_len + 1:
        return []
    sampler = BatchSampler(stream, seq_len, batch_size)
    count = min(count, sampler.num_rows // batch_size)
    return [
        make_batch(sampler.rows(np.arange(i * batch_size, (i + 1) * batch_size)))
        for i in range(count)
    ]

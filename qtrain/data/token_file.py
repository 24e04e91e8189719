"""Pre-tokenized token files: what `prepare` writes and the training path reads.

A token file is one flat array of token ids plus document offsets, so reading
document i is two memory-mapped slices (O(1), nothing loaded up front) and the
training path needs neither seqio nor TensorFlow.

Layout (all integers little-endian)::

  header   64 bytes   struct `_HEADER` below
  tokens   n_tokens * itemsize   uint16 if vocab_size <= 65536, else uint32
  padding  zeros up to a multiple of 8 bytes (keeps offsets aligned)
  offsets  (n_docs + 1) * uint64   offsets[0] = 0, offsets[-1] = n_tokens;
                                   document i is tokens[offsets[i]:offsets[i+1]]

Header fields: magic, format version, itemsize, n_tokens, n_docs, vocab_size,
vocabulary fingerprint (16 ASCII bytes, see `vocab.vocab_fingerprint`) and a
CRC-32 of the payload (tokens, padding, offsets) continued over the header
with its CRC field zeroed, so any flipped byte anywhere is caught.

Files are written to a temporary name and renamed into place: a killed
`prepare` never leaves a half file that looks complete.
"""

from __future__ import annotations

from collections.abc import Iterable
import os
import pathlib
import struct
import zlib

import numpy as np

MAGIC = b"QTRAINTK"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQQ16sI4x")  # 64 bytes.
_CRC_CHUNK = 1 << 22
_FIX = ("Re-create it: re-run `python -m qtrain.data.prepare --task=<task>"
        " --out={dir}` (or `make data` for the default corpus).")


class TokenFileError(ValueError):
  """A token file is missing, corrupt, truncated or inconsistent."""

  def __init__(self, path, problem: str):
    path = pathlib.Path(path)
    super().__init__(f"Token file {path}: {problem}. "
                     + _FIX.format(dir=path.parent))


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 while every id fits (vocab_size <= 65536), else uint32."""
  return np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")


def _padded(nbytes: int) -> int:
  return -(-nbytes // 8) * 8


def _header(itemsize, n_tokens, n_docs, vocab_size, fingerprint, crc) -> bytes:
  fp = fingerprint.encode("ascii")
  if len(fp) > 16:
    raise ValueError(f"fingerprint must be <= 16 ASCII bytes, got {fingerprint!r}")
  return _HEADER.pack(MAGIC, VERSION, itemsize, n_tokens, n_docs, vocab_size,
                      fp, crc)


def _write_docs(f, path, docs, dtype, vocab_size) -> tuple[list[int], int]:
  """Streams the documents' tokens to `f`; returns (offsets, payload crc)."""
  offsets, crc = [0], 0
  for i, doc in enumerate(docs):
    doc = np.asarray(doc)
    if doc.ndim != 1 or (doc.size and not np.issubdtype(doc.dtype, np.integer)):
      raise ValueError(f"{path}: document {i} must be a 1-D integer array, got"
                       f" shape {doc.shape} dtype {doc.dtype}.")
    if doc.size and (doc.min() < 0 or doc.max() >= vocab_size):
      raise ValueError(f"{path}: document {i} has token ids outside"
                       f" [0, {vocab_size}) (min {doc.min()}, max {doc.max()}).")
    data = doc.astype(dtype).tobytes()
    f.write(data)
    crc = zlib.crc32(data, crc)
    offsets.append(offsets[-1] + doc.size)
  pad = bytes(_padded(offsets[-1] * dtype.itemsize) - offsets[-1] * dtype.itemsize)
  data = pad + np.asarray(offsets, dtype="<u8").tobytes()
  f.write(data)
  return offsets, zlib.crc32(data, crc)


def write_token_file(path: str | os.PathLike, docs: Iterable, vocab_size: int,
                     fingerprint: str) -> dict:
  """Writes `docs` (iterable of 1-D int arrays) atomically to `path`.

  Returns {"n_tokens", "n_docs"}. Token ids must lie in [0, vocab_size).
  """
  path = pathlib.Path(path)
  dtype = token_dtype(vocab_size)
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  try:
    with tmp.open("wb") as f:
      f.write(bytes(_HEADER.size))  # Placeholder until the counts are known.
      offsets, crc = _write_docs(f, path, docs, dtype, vocab_size)
      n_tokens, n_docs = offsets[-1], len(offsets) - 1
      fields = (dtype.itemsize, n_tokens, n_docs, vocab_size, fingerprint)
      crc = zlib.crc32(_header(*fields, crc=0), crc)
      f.seek(0)
      f.write(_header(*fields, crc=crc))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return {"n_tokens": n_tokens, "n_docs": n_docs}


class TokenFile:
  """A memory-mapped token file; cheap header and size checks on open.

  `validate()` adds the full checks (checksum, offsets, token range).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise TokenFileError(self.path, "does not exist")
    size = self.path.stat().st_size
    if size < _HEADER.size:
      raise TokenFileError(self.path, f"truncated: {size} bytes, shorter than"
                           f" the {_HEADER.size}-byte header")
    with self.path.open("rb") as f:
      self._header_bytes = f.read(_HEADER.size)
    (magic, version, itemsize, self.num_tokens, self.num_docs, self.vocab_size,
     fp, self.crc) = _HEADER.unpack(self._header_bytes)
    self.fingerprint = fp.rstrip(b"\0").decode("ascii", errors="replace")
    self._check_header(magic, version, itemsize, size)
    self.dtype = np.dtype("<u2" if itemsize == 2 else "<u4")
    mm = np.memmap(self.path, dtype=np.uint8, mode="r")
    end = _HEADER.size + self.num_tokens * itemsize
    self.tokens = mm[_HEADER.size:end].view(self.dtype)
    start = _HEADER.size + _padded(self.num_tokens * itemsize)
    self.offsets = mm[start:].view("<u8")

  def _check_header(self, magic, version, itemsize, size) -> None:
    if magic != MAGIC:
      raise TokenFileError(self.path, f"wrong magic bytes {magic!r} (expected"
                           f" {MAGIC!r}): not a qtrain token file")
    if version != VERSION:
      raise TokenFileError(self.path, f"format version {version}, this code"
                           f" reads version {VERSION}")
    if itemsize not in (2, 4) or token_dtype(self.vocab_size).itemsize != itemsize:
      raise TokenFileError(self.path, f"itemsize {itemsize} does not fit"
                           f" vocab_size {self.vocab_size}")
    expected = (_HEADER.size + _padded(self.num_tokens * itemsize)
                + 8 * (self.num_docs + 1))
    if size != expected:
      what = "truncated" if size < expected else "has trailing bytes"
      raise TokenFileError(self.path, f"{what}: {size} bytes, the header"
                           f" ({self.num_tokens} tokens, {self.num_docs} docs)"
                           f" implies {expected}")

  def doc(self, i: int) -> np.ndarray:
    """Document i as a read-only view into the memory map."""
    if not 0 <= i < self.num_docs:
      raise IndexError(f"document {i} out of range [0, {self.num_docs}) in"
                       f" {self.path}")
    return self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])]

  def doc_lengths(self) -> np.ndarray:
    return np.diff(self.offsets).astype(np.int64)

  def _payload_crc(self) -> int:
    crc = 0
    with self.path.open("rb") as f:
      f.seek(_HEADER.size)
      while chunk := f.read(_CRC_CHUNK):
        crc = zlib.crc32(chunk, crc)
    zeroed = self._header_bytes[:-8] + bytes(8)  # CRC field + 4 reserved.
    return zlib.crc32(zeroed, crc)

  def validate(self) -> TokenFile:
    """Checksum, offsets and token range; raises TokenFileError. Returns self."""
    crc = self._payload_crc()
    if crc != self.crc:
      raise TokenFileError(self.path, f"checksum mismatch (header crc32"
                           f" {self.crc:#010x}, contents {crc:#010x}): corrupt")
    offsets = self.offsets
    if (offsets[0] != 0 or offsets[-1] != self.num_tokens
        or np.any(np.diff(offsets.astype(np.int64)) < 0)):
      raise TokenFileError(self.path, "document offsets are not increasing"
                           f" from 0 to n_tokens={self.num_tokens}")
    if self.num_tokens and int(self.tokens.max()) >= self.vocab_size:
      raise TokenFileError(self.path, f"token id {int(self.tokens.max())} >="
                           f" vocab_size {self.vocab_size}")
    return self

  def __repr__(self) -> str:
    return (f"TokenFile({str(self.path)!r}, docs={self.num_docs},"
            f" tokens={self.num_tokens}, vocab_size={self.vocab_size})")

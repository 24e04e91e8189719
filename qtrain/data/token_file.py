"""Pre-tokenized token files: what `prepare` writes and the training path reads.

A token file is one flat array of token ids plus document offsets, so reading
document i is two memory-mapped slices (O(1), nothing loaded up front) and the
training path needs neither seqio nor TensorFlow. A file may also carry a
per-token loss mask (SFT: 0 on prompt tokens, which the model sees but is not
scored on; 1 on response tokens).

Layout (all integers little-endian)::

  header   64 bytes   struct `_HEADER` below
  tokens   n_tokens * itemsize   uint16 if vocab_size <= 65536, else uint32
  padding  zeros up to a multiple of 8 bytes (keeps offsets aligned)
  mask     n_tokens * uint8 (0/1) + zeros up to a multiple of 8 bytes;
           present only if the header's flags have HAS_MASK (version 2)
  offsets  (n_docs + 1) * uint64   offsets[0] = 0, offsets[-1] = n_tokens;
                                   document i is tokens[offsets[i]:offsets[i+1]]

Header fields: magic, format version, itemsize, n_tokens, n_docs, vocab_size,
vocabulary fingerprint (16 ASCII bytes, see `vocab.vocab_fingerprint`), a
CRC-32 of the payload (tokens, padding, mask, offsets) continued over the
header with its CRC field zeroed, so any flipped byte anywhere is caught, and
flags. Version 1 files (before the mask) have the same layout without a mask
and zero flags: they read as "every token scored".

Files are written to a temporary name and renamed into place: a killed
`prepare` never leaves a half file that looks complete.
"""

from __future__ import annotations

from collections.abc import Iterable
import os
import pathlib
import struct
import tempfile
import zlib

import numpy as np

MAGIC = b"QTRAINTK"
VERSION = 2
READABLE_VERSIONS = (1, 2)
HAS_MASK = 1  # Header flag: a loss mask follows the tokens.
_HEADER = struct.Struct("<8sIIQQQ16sII")  # 64 bytes; the last field is flags.
_CRC_FIELD = slice(56, 60)
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


def _header(itemsize, n_tokens, n_docs, vocab_size, fingerprint, flags,
            crc) -> bytes:
  fp = fingerprint.encode("ascii")
  if len(fp) > 16:
    raise ValueError(f"fingerprint must be <= 16 ASCII bytes, got {fingerprint!r}")
  return _HEADER.pack(MAGIC, VERSION, itemsize, n_tokens, n_docs, vocab_size,
                      fp, crc, flags)


def _checked(path, i, doc, mask, vocab_size) -> tuple[np.ndarray, np.ndarray | None]:
  """One document (and its mask) as arrays, or a ValueError naming it."""
  doc = np.asarray(doc)
  if doc.ndim != 1 or (doc.size and not np.issubdtype(doc.dtype, np.integer)):
    raise ValueError(f"{path}: document {i} must be a 1-D integer array, got"
                     f" shape {doc.shape} dtype {doc.dtype}.")
  if doc.size and (doc.min() < 0 or doc.max() >= vocab_size):
    raise ValueError(f"{path}: document {i} has token ids outside"
                     f" [0, {vocab_size}) (min {doc.min()}, max {doc.max()}).")
  if mask is None:
    return doc, None
  mask = np.asarray(mask)
  if mask.shape != doc.shape or not np.isin(mask, (0, 1)).all():
    raise ValueError(f"{path}: the loss mask of document {i} must be 0/1 with"
                     f" the document's shape {doc.shape}, got {mask.shape}.")
  return doc, mask


def _write_docs(f, path, docs, dtype, vocab_size, with_mask) -> tuple[list[int], int]:
  """Streams the documents (and masks) to `f`; returns (offsets, payload crc).

  Masks go to a temporary file while the tokens stream, then follow them.
  """
  offsets, crc = [0], 0
  with tempfile.TemporaryFile(dir=path.parent) as masks:
    for i, item in enumerate(docs):
      doc, mask = _checked(path, i, *(item if with_mask else (item, None)),
                           vocab_size)
      data = doc.astype(dtype).tobytes()
      f.write(data)
      crc = zlib.crc32(data, crc)
      if with_mask:
        masks.write(mask.astype(np.uint8).tobytes())
      offsets.append(offsets[-1] + doc.size)
    n = offsets[-1]
    pad = bytes(_padded(n * dtype.itemsize) - n * dtype.itemsize)
    f.write(pad)
    crc = zlib.crc32(pad, crc)
    if with_mask:
      masks.write(bytes(_padded(n) - n))
      masks.seek(0)
      while chunk := masks.read(_CRC_CHUNK):
        f.write(chunk)
        crc = zlib.crc32(chunk, crc)
  data = np.asarray(offsets, dtype="<u8").tobytes()
  f.write(data)
  return offsets, zlib.crc32(data, crc)


def write_token_file(path: str | os.PathLike, docs: Iterable, vocab_size: int,
                     fingerprint: str, with_mask: bool = False) -> dict:
  """Writes `docs` atomically to `path`; returns {"n_tokens", "n_docs"}.

  `docs` yields 1-D int arrays with ids in [0, vocab_size), or with
  `with_mask` (tokens, loss_mask) pairs, the mask 0/1 per token (1 = scored).
  """
  path = pathlib.Path(path)
  dtype = token_dtype(vocab_size)
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  flags = HAS_MASK if with_mask else 0
  try:
    with tmp.open("wb") as f:
      f.write(bytes(_HEADER.size))  # Placeholder until the counts are known.
      offsets, crc = _write_docs(f, path, docs, dtype, vocab_size, with_mask)
      n_tokens, n_docs = offsets[-1], len(offsets) - 1
      fields = (dtype.itemsize, n_tokens, n_docs, vocab_size, fingerprint, flags)
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

  `validate()` adds the full checks (checksum, offsets, token range, mask).
  `mask` is the per-token loss mask (uint8 0/1) or None: every token scored.
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
    (magic, self.version, itemsize, self.num_tokens, self.num_docs,
     self.vocab_size, fp, self.crc, self.flags) = _HEADER.unpack(self._header_bytes)
    self.fingerprint = fp.rstrip(b"\0").decode("ascii", errors="replace")
    self._check_header(magic, itemsize, size)
    self.dtype = np.dtype("<u2" if itemsize == 2 else "<u4")
    mm = np.memmap(self.path, dtype=np.uint8, mode="r")
    start = _HEADER.size + _padded(self.num_tokens * itemsize)
    self.tokens = mm[_HEADER.size:_HEADER.size + self.num_tokens * itemsize
                     ].view(self.dtype)
    self.mask = None
    if self.has_mask:
      self.mask = mm[start:start + self.num_tokens]
      start += _padded(self.num_tokens)
    self.offsets = mm[start:].view("<u8")

  @property
  def has_mask(self) -> bool:
    return bool(self.flags & HAS_MASK)

  def _expected_size(self, itemsize: int) -> int:
    mask = _padded(self.num_tokens) if self.has_mask else 0
    return (_HEADER.size + _padded(self.num_tokens * itemsize) + mask
            + 8 * (self.num_docs + 1))

  def _check_header(self, magic, itemsize, size) -> None:
    if magic != MAGIC:
      raise TokenFileError(self.path, f"wrong magic bytes {magic!r} (expected"
                           f" {MAGIC!r}): not a qtrain token file")
    if self.version not in READABLE_VERSIONS:
      raise TokenFileError(self.path, f"format version {self.version}, this"
                           f" code reads versions {READABLE_VERSIONS}")
    if self.flags & ~HAS_MASK or (self.version == 1 and self.flags):
      raise TokenFileError(self.path, f"unknown header flags {self.flags:#x}")
    if itemsize not in (2, 4) or token_dtype(self.vocab_size).itemsize != itemsize:
      raise TokenFileError(self.path, f"itemsize {itemsize} does not fit"
                           f" vocab_size {self.vocab_size}")
    expected = self._expected_size(itemsize)
    if size != expected:
      what = "truncated" if size < expected else "has trailing bytes"
      raise TokenFileError(self.path, f"{what}: {size} bytes, the header"
                           f" ({self.num_tokens} tokens, {self.num_docs} docs"
                           f"{', loss mask' if self.has_mask else ''})"
                           f" implies {expected}")

  def _span(self, i: int) -> slice:
    if not 0 <= i < self.num_docs:
      raise IndexError(f"document {i} out of range [0, {self.num_docs}) in"
                       f" {self.path}")
    return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

  def doc(self, i: int) -> np.ndarray:
    """Document i as a read-only view into the memory map."""
    return self.tokens[self._span(i)]

  def doc_mask(self, i: int) -> np.ndarray:
    """Document i's loss mask (uint8, 1 = scored); all ones without a mask."""
    span = self._span(i)
    if self.mask is None:
      return np.ones(span.stop - span.start, np.uint8)
    return self.mask[span]

  def doc_lengths(self) -> np.ndarray:
    return np.diff(self.offsets).astype(np.int64)

  def _payload_crc(self) -> int:
    crc = 0
    with self.path.open("rb") as f:
      f.seek(_HEADER.size)
      while chunk := f.read(_CRC_CHUNK):
        crc = zlib.crc32(chunk, crc)
    zeroed = bytearray(self._header_bytes)
    zeroed[_CRC_FIELD] = bytes(4)
    return zlib.crc32(bytes(zeroed), crc)

  def validate(self) -> TokenFile:
    """Checksum, offsets, token range, mask values; raises TokenFileError.

    Returns self.
    """
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
    if self.mask is not None and self.num_tokens and int(self.mask.max()) > 1:
      raise TokenFileError(self.path, f"loss mask value {int(self.mask.max())}"
                           " is not 0/1")
    return self

  def __repr__(self) -> str:
    return (f"TokenFile({str(self.path)!r}, docs={self.num_docs},"
            f" tokens={self.num_tokens}, vocab_size={self.vocab_size},"
            f" mask={self.has_mask})")

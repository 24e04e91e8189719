"""Which packed rows of a held-out split an evaluation reads.

The unigram baseline of `prepare` covers the whole split, and a split is laid
out in file order (for the default corpus: book after book), so reading the
first N rows would measure mostly the first books. Instead:

* `num_batches = 0`: every row of every process, the whole split, each target
  token counted exactly once.
* `num_batches = N > 0`: a deterministic sample, at most N batches, whose rows
  are spread evenly over each process's packed stream from its first row to
  its last (row i of k is row floor(i (R - 1) / (k - 1)) of R), so every
  region of the split is represented and no row is read twice.

Pure index arithmetic (no data), so it is testable on its own and identical on
every process.
"""

from __future__ import annotations

import math

import numpy as np


def spread(n_rows: int, k: int) -> np.ndarray:
  """k distinct, increasing row indices from 0 to n_rows - 1, evenly spaced.

  Distinct because the spacing (n_rows - 1) / (k - 1) is >= 1 when k <= n_rows.
  """
  if not 0 <= k <= n_rows:
    raise ValueError(f"cannot pick {k} distinct rows of {n_rows}.")
  if k <= 1:
    return np.zeros(k, np.int64)
  return np.arange(k, dtype=np.int64) * (n_rows - 1) // (k - 1)


def plan(rows_per_process: list[int], per_process: int,
         num_batches: int) -> tuple[int, list[np.ndarray]]:
  """(batches every process runs, each process's row indices to read).

  Every process runs the same number of batches (lock-step collectives); one
  with fewer rows tops its last batches up with padding rows.
  """
  if num_batches < 0:
    raise ValueError(f"config.data.eval_batches={num_batches} must be >= 0"
                     " (0 = the whole held-out split).")
  whole = math.ceil(max(rows_per_process) / per_process)
  n = whole if num_batches == 0 else min(num_batches, whole)
  picks = [spread(r, min(r, n * per_process)) for r in rows_per_process]
  return n, picks

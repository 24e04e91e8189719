"""One process of a two-process CPU training run (tests/test_train.py).

  python tests/multiprocess_worker.py PROCESS_ID PORT WORKDIR DATA LOG STEPS [TERM_AT]

Joins a 2-process JAX cluster on 127.0.0.1 (gloo collectives, 4 CPU devices
each), trains the smoke config to STEPS in WORKDIR and appends, per batch this
process draws, a checksum of its rows to LOG. With TERM_AT, it sends SIGTERM
to itself (only this process) when it draws that batch. Prints the run's
summary as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import zlib

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(pid, port, workdir, data, log, steps, term_at=None):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=pid)
  from configs import default  # pylint: disable=g-import-not-at-top
  from qtrain.data import loader  # pylint: disable=g-import-not-at-top
  from qtrain.train.loop import run  # pylint: disable=g-import-not-at-top

  drawn = []
  original_next = loader._ResumableIterator.__next__  # pylint: disable=protected-access

  def recording_next(self):
    batch = original_next(self)
    drawn.append(1)
    with open(log, "a", encoding="utf-8") as f:
      f.write(f"{zlib.crc32(batch['inputs'].tobytes())}\n")
    if term_at is not None and len(drawn) == term_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  loader._ResumableIterator.__next__ = recording_next  # pylint: disable=protected-access
  cfg = default.get_config("smoke")
  cfg.data.dir = data
  cfg.train.update(steps=steps, checkpoint_every=2, eval_every=100, log_every=1,
                   sample_tokens=4)
  cfg.optim.decay_steps = 8  # A fixed cosine horizon: the resumed run raises train.steps.
  summary = run(cfg, workdir)
  print(json.dumps({k: v for k, v in summary.items() if k != "unigram_ppl"}), flush=True)


if __name__ == "__main__":
  a = sys.argv[1:]
  main(int(a[0]), int(a[1]), a[2], a[3], a[4], int(a[5]), int(a[6]) if len(a) > 6 else None)

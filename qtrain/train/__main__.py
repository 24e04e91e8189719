"""Entry point.

  python -m qtrain.train --config=configs/default.py --workdir=runs/NAME \
      [--config.optim.lr=3e-4 ...]
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TB.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO.
  from qtrain.config import ConfigError  # pylint: disable=g-import-not-at-top
  from qtrain.train.loop import NonFiniteError, run  # pylint: disable=g-import-not-at-top
  try:
    summary = run(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, NonFiniteError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if summary["preempted"]:
    print(f"preempted at step {summary['step']}; checkpoint saved, rerun to resume")
    return
  uni = summary.get("unigram_ppl")
  init = summary.get("initial_ppl")
  print(f"held-out perplexity: initial {init:.2f} -> final {summary['final_ppl']:.2f}"
        f" (unigram {uni:.2f})" if init and uni else
        f"held-out perplexity: final {summary['final_ppl']:.2f}")
  if "sample" in summary:
    print(f"sample: {summary['sample']!r}")


if __name__ == "__main__":
  app.run(main)

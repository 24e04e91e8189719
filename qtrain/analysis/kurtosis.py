"""Activation outlier statistics as Outlier-Safe Pre-Training measures them.

OSP (Park et al., ACL 2025, arXiv 2506.19697) reports the *excess kurtosis*
of hidden states: per token, over the hidden dim D,

    kappa_t = mean_d(x_td^4) / std_d(x_t)^4 - 3,

in float32, where the fourth moment is the *raw* one (not mean-centred) and
std is the population standard deviation (centred, divided by D, as
``numpy.std``); each token's value is clipped at 0 and the clipped values are
averaged over tokens (here: real tokens only, padding masked out). For a
zero-mean token the raw and centred fourth moments agree and kappa_t is
``scipy.stats.kurtosis(x_t)`` (Fisher, biased); for a token with mean mu the
raw moment adds 4 mu m3 + 6 mu^2 m2 + mu^4, so a constant offset shows up as
"outlier" mass, as in the paper. A Gaussian gives ~0, a Laplace ~3; a
hidden state with a few massive channels gives ~D.

Alongside it: max |x| over real tokens, the per-channel mean |x| (the
channel-outlier heatmap) and a histogram of |x| on fixed log-spaced bins
(activation histograms that add up across batches).

Every statistic accumulates in float32 whatever the input dtype.

  python -m qtrain.analysis.kurtosis --workdir=runs/NAME [--step=N] [--batches=N] [--out=DIR]

evaluates a run's checkpoint on held-out batches (``qtrain.analysis.report``)
and writes ``kurtosis_step<N>.json`` and ``.png``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# |x| histogram bins: [0, 1e-3), then 64 log-spaced bins up to 1e5, then [1e5, inf).
HIST_EDGES = np.concatenate([[0.0], np.logspace(-3, 5, 65)])


def token_kurtosis(x):
  """Per-token excess kurtosis over the last axis, unclipped, float32 (the
  module docstring's kappa_t). A token with zero variance gets 0."""
  x = jnp.asarray(x).astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1)  # Two-pass: no cancellation.
  m4 = jnp.mean(jnp.square(jnp.square(x)), axis=-1)  # Raw, as OSP: not centred.
  ok = var > 0
  return jnp.where(ok, m4 / jnp.square(jnp.where(ok, var, 1.0)) - 3.0, 0.0)


def _token_weights(x, mask):
  """float32 [...] weights of the tokens of x [..., D]: 1 real, 0 padding."""
  if mask is None:
    return jnp.ones(x.shape[:-1], jnp.float32)
  return jnp.broadcast_to(mask, x.shape[:-1]).astype(jnp.float32)


def excess_kurtosis(x, mask=None):
  """OSP's excess kurtosis of x [..., D]: per-token kappa_t clipped at 0,
  averaged over the tokens where ``mask`` [...] (broadcast) is true."""
  w = _token_weights(x, mask)
  k = jnp.maximum(token_kurtosis(x), 0.0)
  return jnp.sum(k * w) / jnp.maximum(jnp.sum(w), 1.0)


def max_abs(x, mask=None):
  """max |x| over the real tokens of x [..., D] (0 if there are none)."""
  w = _token_weights(x, mask)
  per_token = jnp.max(jnp.abs(jnp.asarray(x).astype(jnp.float32)), axis=-1)
  return jnp.max(jnp.where(w > 0, per_token, 0.0))


def channel_mean_abs(x, mask=None):
  """[D] mean |x| per channel over the real tokens of x [..., D]."""
  w = _token_weights(x, mask)
  a = jnp.abs(jnp.asarray(x).astype(jnp.float32)).reshape(-1, x.shape[-1])
  return w.reshape(-1) @ a / jnp.maximum(jnp.sum(w), 1.0)


def abs_histogram(x, mask=None):
  """Counts of |x| over the real tokens in the bins of ``HIST_EDGES``
  ([len(HIST_EDGES)] counts: the last bin is [1e5, inf))."""
  w = _token_weights(x, mask)
  a = jnp.abs(jnp.asarray(x).astype(jnp.float32))
  bins = jnp.searchsorted(jnp.asarray(HIST_EDGES[1:], jnp.float32), a, side="right")
  weights = jnp.broadcast_to(w[..., None], a.shape)
  return jnp.zeros(len(HIST_EDGES), jnp.float32).at[bins.reshape(-1)].add(weights.reshape(-1))


def main(argv=None) -> None:
  """The CLI (argparse, not absl flags: importing this module for the math
  must define no flags that would clash with another CLI's)."""
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from qtrain.analysis import report  # pylint: disable=g-import-not-at-top
  from qtrain.train.errors import EXPECTED, one_line  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m qtrain.analysis.kurtosis",
                              description="Activation kurtosis of a run's checkpoint.")
  p.add_argument("--workdir", required=True, help="Training run (config.json, checkpoints/).")
  p.add_argument("--step", type=int, default=None, help="Checkpoint step; default the latest.")
  p.add_argument("--batches", type=int, default=None,
                 help="Held-out batches; default the run's config.data.eval_batches (0: all).")
  p.add_argument("--out", default=None, help="Directory of the JSON + PNG; default the workdir.")
  args = p.parse_args(argv)
  if args.batches is not None and args.batches < 0:
    p.error(f"--batches={args.batches} must be >= 0 (0: the whole held-out split)")
  try:
    r = report.run(args.workdir, args.step, args.batches, args.out)
  except EXPECTED as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    sys.exit(2)
  print(f"step {r['step']}: excess kurtosis {r['kurtosis']:.3f} (embedding output and every "
        f"layer output), max |x| {r['max_abs']:.1f} over {r['tokens']:.0f} tokens")
  print(f"wrote {r['json']} and {r['png']}")


if __name__ == "__main__":
  main()

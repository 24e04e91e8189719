"""Values a model sows (``self.sow("intermediates", name, v)``) as metrics.

The step applies the model with the collections of ``config.train.collect``
mutable; each sown value becomes a metric named by its collection and module
path ("intermediates/decoder/layers/attn/q_rms"). A scalar stays a scalar; a
value sown inside ``nn.scan`` arrives stacked on the leading layer axis, a
per-layer vector the loop logs as ``name/<i>``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qtrain.optim.groups import path_keys


def sown_metrics(collections) -> dict:
  """{name: float32 scalar or [L] vector} of every sown value.

  ``sow`` appends to a tuple; a value sown once is named without its tuple
  index, one sown n times gets ``/0 .. /n-1``.
  """
  flat = jax.tree_util.tree_flatten_with_path(collections)[0]
  counts: dict[tuple, int] = {}
  for path, _ in flat:
    counts[path_keys(path)[:-1]] = counts.get(path_keys(path)[:-1], 0) + 1
  out = {}
  for path, value in flat:
    keys = path_keys(path)
    name = "/".join(keys if counts[keys[:-1]] > 1 else keys[:-1])
    if jnp.ndim(value) > 1:
      raise ValueError(f"sown {name} has shape {jnp.shape(value)}: sow a scalar (nn.scan "
                       "stacks it into a per-layer vector), e.g. jnp.mean(x**2)")
    out[name] = jnp.asarray(value, jnp.float32)
  return out

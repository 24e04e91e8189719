"""A short text sample from the model (greedy or temperature sampling).

No KV cache yet: each new token re-runs the causal forward over a fixed-length
buffer (one compilation; positions past the cursor cannot influence earlier
ones). The quantization issue adds a real (quantized) KV cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def generate(model, params, prompt_ids: list[int], n_new: int, *, eos_id: int | None = None,
             temperature: float = 0.0, seed: int = 0) -> list[int]:
  """Continues ``prompt_ids`` by up to ``n_new`` tokens; returns the new ones."""
  length = len(prompt_ids) + n_new
  buf = np.zeros((1, length), np.int32)
  buf[0, :len(prompt_ids)] = prompt_ids

  @jax.jit
  def next_token(params, tokens, cursor, rng):
    logits = model.apply({"params": params}, tokens)[0, cursor - 1].astype(jnp.float32)
    if temperature <= 0:
      return jnp.argmax(logits)
    return jax.random.categorical(rng, logits / temperature)

  rng = jax.random.key(seed)
  out = []
  for cursor in range(len(prompt_ids), length):
    rng, sub = jax.random.split(rng)
    tok = int(next_token(params, jnp.asarray(buf), cursor, sub))
    if eos_id is not None and tok == eos_id:
      break
    buf[0, cursor] = tok
    out.append(tok)
  return out

"""Text from the model (greedy or temperature sampling) with a KV cache.

The prompt is prefilled in one forward that writes its K/V into a cache of
``len(prompt) + n_new`` slots; each new token is then one single-token forward
that appends its K/V and attends to the cache (``qtrain.layers.kv_cache``:
quantized K/V when the model's quant provider has a KV spec). Prefill and
step are each compiled once per (model, buffer length, prompt length).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qtrain.layers.kv_cache import init_cache


def decode(model, params, cache, tokens_BT, positions_BT):
  """Runs tokens_BT at positions_BT against ``cache``: (logits_BTV, new cache)."""
  logits_BTV, mutated = model.apply({"params": params, "cache": cache}, tokens_BT,
                                    positions_BT, decode=True, mutable=["cache"])
  return logits_BTV, mutated["cache"]


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _next_token(model, params, cache, tokens_BT, positions_BT, rng, temperature):
  """Token after the last of tokens_BT: argmax at temperature <= 0, else a
  sample at ``temperature`` (traced: greedy and sampling share one compile)."""
  logits_BTV, cache = decode(model, params, cache, tokens_BT, positions_BT)
  logits_BV = logits_BTV[:, -1].astype(jnp.float32)
  sample_B = jax.random.categorical(rng, logits_BV / jnp.maximum(temperature, 1e-6), axis=-1)
  return jnp.where(temperature > 0, sample_B, jnp.argmax(logits_BV, axis=-1)), cache


def generate(model, params, prompt_ids: list[int], n_new: int, *, eos_id: int | None = None,
             temperature: float = 0.0, seed: int = 0) -> list[int]:
  """Continues ``prompt_ids`` by up to ``n_new`` tokens; returns the new ones
  (stopping before ``eos_id``)."""
  if not prompt_ids:
    raise ValueError("generate needs a prompt of at least one token (e.g. BOS)")
  if n_new <= 0:
    return []
  cache = init_cache(model, 1, len(prompt_ids) + n_new)
  tokens_BT = jnp.asarray([prompt_ids], jnp.int32)
  positions_BT = jnp.arange(len(prompt_ids), dtype=jnp.int32)[None]
  rng = jax.random.key(seed)
  out = []
  for cursor in range(len(prompt_ids), len(prompt_ids) + n_new):
    rng, sub = jax.random.split(rng)
    tok_B, cache = _next_token(model, params, cache, tokens_BT, positions_BT, sub,
                               jnp.float32(temperature))
    tok = int(tok_B[0])
    if eos_id is not None and tok == eos_id:
      break
    out.append(tok)
    tokens_BT = tok_B[:, None].astype(jnp.int32)
    positions_BT = jnp.full((1, 1), cursor, jnp.int32)
  return out

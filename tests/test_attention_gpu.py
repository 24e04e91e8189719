"""cuDNN flash attention vs the XLA reference path (GPU only; skipped on CPU).

Run on a GPU machine: ``python -m pytest tests/test_attention_gpu.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtrain.layers.attention import cudnn_attention, xla_attention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def _inputs(B=2, T=256, N=8, K=2, H=64, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (B, T, N, H), jnp.bfloat16)
  k = jax.random.normal(ks[1], (B, T, K, H), jnp.bfloat16)
  v = jax.random.normal(ks[2], (B, T, K, H), jnp.bfloat16)
  return q, k, v


def _packed_segments(B, T):
  seg = np.zeros((B, T), np.int32)
  seg[0, :100], seg[0, 100:180], seg[0, 180:250] = 1, 2, 3  # 6 padding tokens.
  seg[1, :] = 1
  return jnp.asarray(seg)


@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_matches_xla_forward_and_grad(packed):
  q, k, v = _inputs()
  seg = _packed_segments(q.shape[0], q.shape[1]) if packed else None
  valid = (seg > 0)[..., None, None] if packed else jnp.ones(q.shape[:2] + (1, 1), bool)

  def loss(fn, q, k, v):
    out = fn(q, k, v, seg).astype(jnp.float32)
    return jnp.sum(jnp.where(valid, out, 0.0) ** 2), out

  (l_ref, o_ref), g_ref = jax.value_and_grad(
      lambda *a: loss(xla_attention, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  (l_cud, o_cud), g_cud = jax.value_and_grad(
      lambda *a: loss(cudnn_attention, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  # bf16 inputs, float32 softmax in both: differences are bf16 rounding of the
  # probabilities and outputs (relative 2^-8), so compare at a few bf16 ulps.
  o_ref, o_cud = np.where(valid, o_ref, 0), np.where(valid, o_cud, 0)
  np.testing.assert_allclose(o_cud, o_ref, atol=3e-2, rtol=3e-2)
  for a, b in zip(g_cud, g_ref):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=6e-2, rtol=6e-2)

"""The ``dots_no_batch_attn`` remat policy: attention's forward runs once.

cuDNN cannot run on CPU, but JAX traces its attention to the same jaxpr as
on a GPU: the structure tests trace (``jax.make_jaxpr``, never compiled) the
gradient with ``attention_impl="cudnn"`` and count the cuDNN forward
primitives JAX's remat left in it. Tracing needs two of JAX's GPU checks
(cuDNN's version, flash-attention support, both asking the device) replaced
for the duration of the test; nothing else of the cuDNN path is touched.
The numerics tests run the XLA path, the one the CPU executes.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa

from qtrain.analysis import jaxprs
from qtrain.layers import ModelConfig, Transformer
from qtrain.layers import attention

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=8, d_ff=64, init_std=0.2)
CUDNN_CFG = dataclasses.replace(CFG, dtype="bfloat16", attention_impl="cudnn")
B, T = 2, 16


@pytest.fixture
def traceable_cudnn(monkeypatch):
  # Both ask the GPU; the version only gates features, 9.10 allows them all.
  monkeypatch.setattr(cudnn_fa, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(cudnn_fa, "check_is_flash_attention", lambda *a, **k: None)


def loss_fn(cfg, packed: bool = False):
  tokens_BT = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (B, T)), jnp.int32)
  segment_ids_BT = positions_BT = None
  if packed:  # Two documents per row.
    segment_ids_BT = jnp.repeat(jnp.array([1, 2]), T // 2)[None].repeat(B, 0)
    positions_BT = jnp.tile(jnp.arange(T // 2), 2)[None].repeat(B, 0)

  def loss(params):
    logits_BTV = Transformer(cfg).apply({"params": params}, tokens_BT, positions_BT,
                                        segment_ids_BT)
    return jnp.mean(jax.nn.log_softmax(logits_BTV.astype(jnp.float32))[..., 0])
  return loss


def abstract_params(cfg):
  tokens_BT = jnp.zeros((1, T), jnp.int32)
  return nn.meta.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens_BT))["params"]


def residual_size(cfg, packed=False) -> int:
  """Elements the backward keeps: the residuals held by the VJP closure."""
  loss, params = loss_fn(cfg, packed), abstract_params(cfg)
  return sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)))


@pytest.mark.parametrize("scan,packed", [(True, False), (False, False), (True, True)],
                         ids=["scan", "unscanned", "packed"])
def test_cudnn_forward_runs_once_per_layer(traceable_cudnn, scan, packed):
  per_jaxpr = 1 if scan else CFG.n_layers  # A scan body appears once for all layers.
  counts, sizes = {}, {}
  for policy in ("dots_no_batch", "dots_no_batch_attn"):
    cfg = dataclasses.replace(CUDNN_CFG, scan_layers=scan, remat_policy=policy)
    grad = jax.make_jaxpr(jax.grad(loss_fn(cfg, packed)))(abstract_params(cfg))
    counts[policy] = (jaxprs.count(grad, "dot_product_attention_fwd_wrapper"),
                      jaxprs.count(grad, "dot_product_attention_bwd_wrapper"))
    sizes[policy] = residual_size(cfg, packed)
  # Old: the forward, then its remat recomputation in the backward. New: the
  # forward only; one backward kernel either way.
  assert counts["dots_no_batch"] == (2 * per_jaxpr, per_jaxpr), counts
  assert counts["dots_no_batch_attn"] == (per_jaxpr, per_jaxpr), counts
  # What is kept in exchange, exactly: per layer the output [B, T, N, H] and
  # the softmax statistics [B * M, N, T] (M packed segments per row; cuDNN's
  # packed layout sizes them by CFG.attention_max_segments).
  m = CFG.attention_max_segments if packed else 1
  extra = CFG.n_layers * (B * T * CFG.n_heads * CFG.head_dim + B * m * CFG.n_heads * T)
  assert sizes["dots_no_batch_attn"] - sizes["dots_no_batch"] == extra, sizes


def test_missing_cudnn_primitive_names_the_field(monkeypatch):
  monkeypatch.setattr(cudnn_fa, "_dot_product_attention_fwd_p_wrapper", None)
  attention._cudnn_forward_primitive.cache_clear()
  try:
    cfg = dataclasses.replace(CFG, remat_policy="dots_no_batch_attn")
    with pytest.raises(RuntimeError, match=r"config.model.remat_policy='dots_no_batch_attn'"):
      jax.make_jaxpr(jax.grad(loss_fn(cfg)))(abstract_params(cfg))
  finally:
    monkeypatch.undo()
    attention._cudnn_forward_primitive.cache_clear()


def batched_dots(jaxpr) -> int:
  """dot_generals with batch dimensions (attention's einsums) in ``jaxpr``."""
  return sum(eqn.primitive.name == "dot_general" and bool(eqn.params["dimension_numbers"][1][0])
             for eqn, _ in jaxprs.eqns(jaxpr))


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscanned"])
def test_xla_path_same_loss_and_grads(scan):
  cfg = dataclasses.replace(CFG, scan_layers=scan)
  params = jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, T), jnp.int32))
  params = nn.meta.unbox(params)["params"]
  results, dots = {}, {}
  for policy in ("dots_no_batch", "dots_no_batch_attn"):
    loss = loss_fn(dataclasses.replace(cfg, remat_policy=policy))
    results[policy] = jax.jit(jax.value_and_grad(loss))(params)
    dots[policy] = batched_dots(jax.make_jaxpr(jax.grad(loss))(params))
  (loss0, grads0), (loss1, grads1) = results["dots_no_batch"], results["dots_no_batch_attn"]
  # The same float32 ops either way; the saved output is the value the
  # recomputation would give, so only XLA's fusion choices could move a sum
  # (measured: bit-identical on CPU). A few float32 ulps.
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  jax.tree.map(lambda g, g0: np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-7),
               grads1, grads0)
  # The XLA analogue of the cuDNN saving: the output is kept, so the backward
  # recomputes Q K^T but not the probabilities times V (one einsum per layer).
  per_jaxpr = 1 if scan else CFG.n_layers
  assert dots["dots_no_batch"] - dots["dots_no_batch_attn"] == per_jaxpr, dots


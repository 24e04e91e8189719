"""SLTrain's merged product (``sparse_low_rank`` with ``merged=True``): y =
x @ (A B + S) in one matmul through the hook, the same function and gradients
as the three products x A B + x S (the form's ``merged=False``) and as float64
NumPy; the hook (a weight quantizer) sees W = A B + S at the layer's path; the
train step's compiled temp memory is near the dense model's instead of the
three products' (qtrain/layers/weights.py says why).

Tolerances: float32 against float64 over contractions of at most 12 terms of
O(1) values: 1e-5 relative, 1e-6 absolute (float32's eps is 6e-8; the two
float32 orders of summation, x (A B) and (x A) B, differ by a few eps).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from qtrain.config.variants import config_module
from qtrain.layers.hooks import Hooks, Provider
from qtrain.layers.linear import Linear
from qtrain.layers.registry import trace_sites
from qtrain.layers.weights import form_rules, sparse_support
from qtrain.quant import QuantProvider, QuantRule, QuantSpec
from qtrain.quant.estimators import fake_quant_ste
from qtrain.train.build import build_model
from step_util import train_temp_bytes  # pytest puts tests/ on sys.path

FAN_IN, FAN_OUT, RANK, DENSITY, SEED, LAYER = 12, 10, 3, 0.25, 5, 1
NNZ = round(DENSITY * FAN_IN * FAN_OUT)
TOL = dict(rtol=1e-5, atol=1e-6)


@dataclasses.dataclass(frozen=True, eq=False)
class _WeightSeen(Provider):
  """Keeps the weight operand every matmul hands the hook (what a quantizer sees)."""
  seen: list = dataclasses.field(default_factory=list)

  def dot(self, site, hooks, inner):
    def fn(module, lhs, rhs, *args):
      self.seen.append((site.path, np.asarray(rhs, np.float64)))
      return inner(module, lhs, rhs, *args)
    return fn


def _layer(merged: bool, *providers):
  rules = form_rules((dict(pattern=".*", form="sparse_low_rank", rank=RANK, density=DENSITY,
                           seed=SEED, merged=merged),))
  return Linear(FAN_OUT, ("embed", "mlp"),
                hooks=Hooks(providers=providers, forms=rules, layer=LAYER))


def _support():
  rows, cols = (np.asarray(i) for i in sparse_support(SEED, "", LAYER, FAN_IN, FAN_OUT, NNZ))
  return rows, cols


def _value_and_grads(layer, params, x, g):
  """y and the gradients of sum(y * g) wrt the params and x (float64)."""
  def loss(p, x):
    y = layer.apply({"params": p}, x)
    return jnp.sum(y * g), y
  (_, y), (dp, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  f64 = lambda t: np.asarray(t, np.float64)
  return f64(y), {k: f64(v) for k, v in dp.items()}, f64(dx)


def test_merged_product_equals_float64_numpy_and_the_three_products():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, FAN_IN))
  g = rng.normal(size=(2, 3, FAN_OUT))
  x32, g32 = jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32)
  merged, three = _layer(True), _layer(False)
  params = nn.unbox(merged.init(jax.random.key(0), x32)["params"])
  # The same params serve both ways: the form's choice changes no param.
  other = nn.unbox(three.init(jax.random.key(0), x32)["params"])
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, other)
  assert all(np.array_equal(params[k], other[k]) for k in params)

  a, b, s = (np.asarray(params[k], np.float64) for k in ("a", "b", "s"))
  rows, cols = _support()
  # Duplicated entries, so the reference checks that they add (scatter-add).
  assert len(set(zip(rows.tolist(), cols.tolist()))) < NNZ
  w = a @ b
  np.add.at(w, (rows, cols), s)
  xf, gf = x.reshape(-1, FAN_IN), g.reshape(-1, FAN_OUT)
  dw = xf.T @ gf  # d sum(x W * g) / dW.
  want = {"a": dw @ b.T, "b": a.T @ dw, "s": dw[rows, cols]}  # Each duplicate gets dW's entry.
  want_dx = g @ w.T

  y, dp, dx = _value_and_grads(merged, params, x32, g32)
  np.testing.assert_allclose(y, x @ w, **TOL)
  np.testing.assert_allclose(dx, want_dx, **TOL)
  for k in want:
    np.testing.assert_allclose(dp[k], want[k], **TOL, err_msg=k)

  y3, dp3, dx3 = _value_and_grads(three, params, x32, g32)
  np.testing.assert_allclose(y, y3, **TOL)
  np.testing.assert_allclose(dx, dx3, **TOL)
  for k in want:
    np.testing.assert_allclose(dp[k], dp3[k], **TOL, err_msg=k)


def test_merged_hook_sees_w_at_the_layer_path_and_the_model_has_one_site_a_layer():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, FAN_IN)), jnp.float32)
  seen = _WeightSeen()
  layer = _layer(True, seen)
  params = nn.unbox(layer.init(jax.random.key(0), x)["params"])
  seen.seen.clear()
  layer.apply({"params": params}, x)
  a, b, s = (np.asarray(params[k], np.float64) for k in ("a", "b", "s"))
  w = a @ b
  np.add.at(w, _support(), s)
  assert [p for p, _ in seen.seen] == [""]  # One product, at the layer's own path.
  np.testing.assert_allclose(seen.seen[0][1], w, **TOL)  # The merged weight, [in, out].

  c = default.get_config("smoke")
  c.model.weight_forms = (dict(pattern=r"decoder/layers/mlp/.*", form="sparse_low_rank",
                               rank=8, merged=True),)
  sites = trace_sites(build_model(c)).paths()
  up = "decoder/layers/mlp/up_proj"
  assert up in sites and not any(p.startswith(up + "/") for p in sites), sites


def test_weight_quantizer_quantizes_the_merged_w():
  """A 4-bit per-channel weight rule on the layer's own path: y = x @ q(A B + S)
  (q: the quantizer's own fake quant on the [in, out] weight, contraction axis
  0, as for a dense kernel), not the factors quantized apart."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, FAN_IN)), jnp.float32)
  quant = QuantProvider(rules=(QuantRule(pattern=".*", weight=QuantSpec(bits=4)),),
                        mode="fake")
  layer = _layer(True, quant)
  params = nn.unbox(layer.init(jax.random.key(0), x)["params"])
  a, b, s = (np.asarray(params[k], np.float64) for k in ("a", "b", "s"))
  w = a @ b
  np.add.at(w, _support(), s)
  w_hat = np.asarray(fake_quant_ste(jnp.asarray(w, jnp.float32), QuantSpec(bits=4),
                                    contract_axis=0), np.float64)
  assert np.abs(w_hat - w).max() > 1e-3  # 4 bits move W: the check can see the quantizer.
  y = np.asarray(layer.apply({"params": params}, x), np.float64)
  np.testing.assert_allclose(y, np.asarray(x, np.float64) @ w_hat, **TOL)


def test_merged_refuses_a_non_bool():
  with pytest.raises(ValueError, match=r"config.model.weight_forms\[0\].merged='yes'"):
    form_rules((dict(pattern=".*", form="sparse_low_rank", rank=4, merged="yes"),))


# ------------------------------------------------------------ compiled memory --

ROWS, SEQ = 32, 64


def _train_temp_bytes(form: str, merged: bool = False) -> int:
  """Temp bytes of the compiled first-order train step (one device, compile
  only) of the smoke model with ``form`` on every attention and MLP projection,
  under the 125M configs' remat policy. Vocabulary 256: the [B, T, V] logits
  (2 MiB) stay below the blocks' saved activations, the thing compared.
  Plain SGD, not AdamW: the update runs in place after the backward pass, so
  the temp bytes are the same with either (measured: 23.64, 38.42 and 27.26
  MiB both ways), and the step compiles in ~2/3 of the time."""
  c = default.get_config("smoke")
  c.model.update(vocab_size=256, remat_policy="dots_no_batch", dtype="bfloat16")
  c.optim.name = "sgd"
  c.data.update(seq_len=SEQ, global_batch_size=ROWS, eval_batch_size=ROWS)
  c.mesh.update(data=1, fsdp=1, pipeline=1, sequence=1, tensor=1)
  if form != "dense":
    rule = dict(pattern=config_module("optim._base").FORMS_AT, form=form,
                rank=c.model.d_model // 4, density=0.03)
    if merged:
      rule["merged"] = True
    c.model.weight_forms = (rule,)
  return train_temp_bytes(c)


def test_merged_train_step_temp_memory_is_the_dense_models():
  """The three products keep x A, x A B and x S of every projection (all
  matmul outputs, saved by ``dots_no_batch``); the merged product keeps x W
  as the dense layer does, plus A B per layer (weight-sized; jax's
  print_saved_residuals lists exactly these). Measured on CPU (jax 0.10.2,
  bfloat16 compute as the 125M configs): dense 23.6 MiB, three products
  (before this form had ``merged``) 38.4 MiB = 1.63x, merged 27.3 MiB =
  1.15x (backward temporaries of building W: dW per layer, the scatter and
  its gather); at llama_125m, 64 x 1024 tokens: 44.24, 69.28 and 44.37 GiB.
  The bounds leave room for another XLA's buffer assignment and still tell
  the two apart."""
  dense = _train_temp_bytes("dense")
  three = _train_temp_bytes("sparse_low_rank")
  merged = _train_temp_bytes("sparse_low_rank", merged=True)
  mib = lambda n: f"{n / 2**20:.1f} MiB"
  assert merged <= 1.25 * dense, (mib(dense), mib(three), mib(merged))
  assert merged <= 0.8 * three, (mib(dense), mib(three), mib(merged))


def test_sltrain_recipe_merges_and_ptq_of_a_merged_model_is_refused_by_name():
  """configs/optim/sltrain_restarts.py uses the merged product; PTQ of such a
  model has no [in, out] kernel to quantize and says so, naming the field."""
  from configs.quant import w4a16  # pylint: disable=g-import-not-at-top
  from qtrain.layers import ModelConfig  # pylint: disable=g-import-not-at-top
  from qtrain.quant.config import rules_from_config  # pylint: disable=g-import-not-at-top
  from qtrain.quantize import weight_sites  # pylint: disable=g-import-not-at-top
  cfg = config_module("optim.sltrain_restarts").get_config("smoke")
  model_cfg = ModelConfig.of(cfg.model)
  assert [dict(r.options).get("merged") for r in model_cfg.weight_forms] == [True]
  rules = rules_from_config(w4a16.get_quant())
  with pytest.raises(ValueError, match=r"config.model.weight_forms\[0\]: PTQ of sparse_low_rank"):
    weight_sites(model_cfg, rules)
  cfg.model.weight_forms[0]["merged"] = False
  assert weight_sites(ModelConfig.of(cfg.model), rules)[0]  # The factors' sites, as before.

"""Config validation (in-process) and the optimizer builder against a float64
NumPy AdamW."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, llama_1b, llama_125m
from qtrain.config import ConfigError, validate
from qtrain.optim import build_optimizer, decay_mask, learning_rate_schedule


@pytest.mark.parametrize("mod", [default, llama_125m, llama_1b])
@pytest.mark.parametrize("variant", ["", "smoke", "smoke,w4a4kv4", "smoke,w8a8+lm_head"])
def test_shipped_configs_validate(mod, variant):
  validate(mod.get_config(variant), n_devices=8)


def test_llama_1b_has_the_tinyllama_shape():
  m = llama_1b.get_config().model
  assert (m.n_layers, m.d_model, m.d_ff, m.n_heads, m.n_kv_heads, m.vocab_size,
          m.tie_embeddings) == (22, 2048, 5632, 32, 4, 32000, False)
  m = llama_125m.get_config().model
  assert (m.n_layers, m.d_model, m.d_ff, m.n_heads, m.vocab_size) == (12, 768, 2048, 12, 32000)


@pytest.mark.parametrize("edit, message", [
    (lambda c: setattr(c.model, "n_kv_heads", 3), "config.model.n_kv_heads=3 does not divide"),
    (lambda c: setattr(c.model, "head_dim", 15), "config.model.head_dim=15 must be even"),
    (lambda c: setattr(c.data, "global_batch_size", 12), "config.data.global_batch_size=12"),
    (lambda c: setattr(c.data, "seq_len", 1024), "config.data.seq_len=1024 exceeds"),
    (lambda c: setattr(c.train, "nan_policy", "ignore"), "config.train.nan_policy"),
    (lambda c: setattr(c.model, "remat_policy", "some"), "config.model.remat_policy"),
    (lambda c: setattr(c.optim, "warmup_steps", 10_000), "config.optim.warmup_steps"),
])
def test_bad_values_name_the_field(edit, message):
  c = default.get_config()
  edit(c)
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
    validate(c, n_devices=8)


def test_unknown_key_suggests_the_close_one():
  c = default.get_config()
  c.unlock()
  c.model.n_head = 4
  with pytest.raises(ConfigError, match=r"config\.model\.n_head .*did you mean config\.model\.n_heads"):
    validate(c, n_devices=1)


def test_bad_quant_spec_fails_validation_naming_the_field():
  c = default.get_config("w4a4")
  rules = [dict(r) for r in c.quant.rules]
  rules[0]["weight"] = dict(rules[0]["weight"], bits=1)
  c.quant.rules = tuple(rules)
  with pytest.raises(ConfigError, match=r"config\.quant\.rules\[0\]\.weight\.bits=1"):
    validate(c, n_devices=1)


def test_schedule_is_linear_warmup_then_cosine():
  c = default.get_config().optim
  c.update(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
  sched = learning_rate_schedule(c, total_steps=110)
  assert float(sched(0)) == 0.0
  assert math.isclose(float(sched(5)), 5e-4, rel_tol=1e-6)
  assert math.isclose(float(sched(10)), 1e-3, rel_tol=1e-6)
  mid = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 0.5))
  assert math.isclose(float(sched(60)), mid, rel_tol=1e-5)
  assert math.isclose(float(sched(110)), 1e-4, rel_tol=1e-5)


def test_decay_mask_by_path():
  params = {"embedding": 0, "final_norm": {"scale": 0},
            "decoder": {"layers": {"attn": {"q_proj": {"kernel": 0}},
                                   "attn_norm": {"scale": 0}}},
            "lm_head": {"kernel": 0, "dot_general": {"weight_step": 0}}}
  mask = decay_mask(params, default.get_config().optim.no_decay)
  assert mask["embedding"] is False and mask["final_norm"]["scale"] is False
  assert mask["decoder"]["layers"]["attn_norm"]["scale"] is False
  assert mask["decoder"]["layers"]["attn"]["q_proj"]["kernel"] is True
  assert mask["lm_head"]["kernel"] is True
  assert mask["lm_head"]["dot_general"]["weight_step"] is False


def test_adamw_steps_match_float64_numpy():
  """Three steps of the built optimizer vs AdamW written out in float64
  (Loshchilov & Hutter 2019, decoupled decay, masked); float32 state, so
  agreement to ~1e-6 relative."""
  c = default.get_config().optim
  c.update(lr=1e-2, warmup_steps=1, weight_decay=0.1, grad_clip=0.0)
  tx = build_optimizer(c, total_steps=10)
  sched = learning_rate_schedule(c, 10)
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(4, 3)), "final_norm": {"scale": rng.normal(size=(3,))}}
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape), params) for _ in range(3)]
  p32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(p32)
  ref = jax.tree.map(np.copy, params)
  mu = jax.tree.map(np.zeros_like, params)
  nu = jax.tree.map(np.zeros_like, params)
  for t, g in enumerate(grads, start=1):
    upd, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p32)
    p32 = jax.tree.map(lambda a, b: a + b, p32, upd)
    lr = float(sched(t - 1))
    for path, decay in (("w", True), ("scale", False)):
      get = (lambda tree: tree["w"]) if path == "w" else (lambda tree: tree["final_norm"]["scale"])
      m = c.b1 * get(mu) + (1 - c.b1) * get(g)
      v = c.b2 * get(nu) + (1 - c.b2) * get(g) ** 2
      get(mu)[...] = m
      get(nu)[...] = v
      step = (m / (1 - c.b1 ** t)) / (np.sqrt(v / (1 - c.b2 ** t)) + c.eps)
      if decay:
        step = step + c.weight_decay * get(ref)
      get(ref)[...] = get(ref) - lr * step
  np.testing.assert_allclose(np.asarray(p32["w"]), ref["w"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(p32["final_norm"]["scale"]), ref["final_norm"]["scale"],
                             rtol=1e-5, atol=1e-6)

"""The core's seams: weight forms, the traced matmul registry, composed
providers and named sites, per-layer rules under nn.scan, learned steps from
real data. References are float64 NumPy or the model's own unscanned /
unquantized path; tolerances sit next to each assertion."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.quant import w4a4, w8a8
from qtrain.layers import (Hooks, Linear, ModelConfig, Provider, Transformer, form_rules,
                           trace_sites)
from qtrain.quant import (QuantProvider, QuantRule, QuantSpec, calibrate_learned_steps,
                          learned_step_paths, provider_from_config, validate_quant)
from qtrain.quant.estimators import fake_quant_ste
from qtrain.quantize import collect_stats, weight_sites
from test_quant_dot import count_dots  # pytest puts tests/ on sys.path (rootdir-relative import)

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, init_std=0.2, attention_impl="xla")
LOW_RANK = form_rules([dict(pattern=r"decoder/layers/mlp/(up|down)_proj", form="low_rank",
                            rank=4)])
W8 = QuantSpec(bits=8)
A8 = QuantSpec(bits=8, granularity="token")


def tokens(b=2, t=8, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(1, 64, size=(b, t)), jnp.int32)


def init(model, toks=None):
  toks = tokens() if toks is None else toks
  return nn.unbox(jax.jit(model.init)(jax.random.key(0), toks)["params"])


def logits(model, params, toks, **kw):
  return np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t, **kw))(params, toks),
                    np.float64)


# --- weight forms -------------------------------------------------------------


def test_low_rank_form_computes_x_a_b_and_keeps_the_dense_variance():
  cfg = dataclasses.replace(CFG, weight_forms=LOW_RANK)
  params = init(Transformer(cfg))
  up = params["decoder"]["layers"]["mlp"]["up_proj"]
  assert up["a"].shape == (3, 32, 4) and up["b"].shape == (3, 4, 64) and "kernel" not in up
  assert params["decoder"]["layers"]["mlp"]["gate_proj"]["kernel"].shape == (3, 32, 64)
  # One Linear on its own against float64 NumPy: y = (x A) B.
  lin = Linear(
      64, ("embed", "mlp"), hooks=Hooks(forms=form_rules([dict(pattern=".*", form="low_rank",
                                                               rank=4)])), init_std=0.2)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 32)), jnp.float32)
  p = lin.init(jax.random.key(3), x)["params"]
  a, b = (np.asarray(nn.unbox(p[k]), np.float64) for k in ("a", "b"))
  # float32 products over 32 and 4 terms: relative error a few ulps.
  np.testing.assert_allclose(np.asarray(lin.apply({"params": p}, x)),
                             np.asarray(x, np.float64) @ a @ b, rtol=1e-5, atol=1e-6)
  # Init (weights.LowRank): each entry of A B has the dense init's variance sigma^2.
  big = lin.clone(features=512)
  pb = big.init(jax.random.key(4), x)["params"]
  w = np.asarray(nn.unbox(pb["a"]), np.float64) @ np.asarray(nn.unbox(pb["b"]), np.float64)
  x64 = np.random.default_rng(5).normal(size=(4096, 32))
  del x64
  ratio = np.var(w) / 0.2 ** 2
  assert 0.85 < ratio < 1.15  # Spread of a variance estimate over 32 x 512 entries: ~3%.


def test_bad_weight_form_rules_name_the_field():
  with pytest.raises(ValueError, match=r"weight_forms\[0\]\.form='sparse'"):
    form_rules([dict(pattern=".*", form="sparse")])
  with pytest.raises(ValueError, match=r"weight_forms\[0\]\.rank=None"):
    form_rules([dict(pattern=".*", form="low_rank")])
  with pytest.raises(ValueError, match=r"weight_forms\[0\]\.rnak is not an option"):
    form_rules([dict(pattern=".*", form="low_rank", rank=2, rnak=3)])


# --- the registry -------------------------------------------------------------


@pytest.mark.parametrize("scan,forms,tie", [(True, (), False), (False, (), False),
                                           (True, LOW_RANK, False), (True, (), True)])
def test_registry_lists_every_weight_the_model_multiplies(scan, forms, tie):
  cfg = dataclasses.replace(CFG, scan_layers=scan, weight_forms=forms, tie_embeddings=tie)
  model = Transformer(cfg)
  sites = trace_sites(model)
  flat = jax.tree_util.tree_flatten_with_path(
      nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens())["params"]))[0]
  weights = {tuple(k.key for k in path) for path, leaf in flat
             if path[-1].key in ("kernel", "a", "b")}
  if tie:
    weights.add(("embedding",))
  assert {s.param for s in sites.matmuls} == weights  # Every matmul weight, nothing else.
  n_blocks = len([s for s in sites.matmuls if s.layered])
  per_block = 7 + (2 if forms else 0)  # Two low-rank linears add one product each.
  assert n_blocks == per_block * (1 if scan else cfg.n_layers)
  assert sites.kv_paths == ("decoder/layers/attn",)


def test_low_rank_factors_quantized_by_the_preset_and_listed_for_ptq():
  cfg = dataclasses.replace(CFG, weight_forms=LOW_RANK)
  model = Transformer(cfg, provider_from_config(w8a8.get_quant(), cfg))
  toks = tokens()
  params = jax.eval_shape(model.init, jax.random.key(0), toks)["params"]
  loss = lambda p: jnp.mean(model.apply({"params": p}, toks).astype(jnp.float32) ** 2)
  counts = count_dots(jax.make_jaxpr(jax.value_and_grad(loss))(nn.unbox(params)).jaxpr)
  # 5 dense + 2 x 2 factors per (scanned) block, each forward + dX + dW in int8.
  assert counts[("int8", "int8", "int32")] == 3 * 9
  sites, _ = weight_sites(cfg, validate_quant(w4a4.get_quant(), cfg))
  assert {"decoder/layers/mlp/up_proj/a", "decoder/layers/mlp/up_proj/b"} <= {
      s.path for s in sites}


# --- providers compose; named sites -------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scale(Provider):
  """Multiplies (or shifts) every matmul's activations by c: a stand-in for a rotation."""
  c: float = 2.0
  shift: bool = False

  def dot(self, site, hooks, inner):
    return lambda m, x, w, *a: inner(m, x + self.c if self.shift else x * self.c, w, *a)


@dataclasses.dataclass(frozen=True)
class Sow(Provider):
  """Sows the mean square of each named site (a stand-in for telemetry)."""

  def activation(self, path, name, hooks, module, x):
    module.sow("intermediates", f"ms_{name}", jnp.mean(jnp.square(x.astype(jnp.float32))))
    return x


def test_providers_compose_outermost_first():
  """(Shift, quant): the quantizer sees x + 0.5; (quant, Shift): Q(x) + 0.5."""
  from qtrain.quant import fake_quant  # pylint: disable=g-import-not-at-top
  act = QuantSpec(bits=4, granularity="tensor")
  quant = QuantProvider(rules=(QuantRule(pattern=".*", act=act),), mode="fake")
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(6, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
  y = lambda providers: np.asarray(Linear(16, ("embed", "mlp"), hooks=providers).apply(
      {"params": {"kernel": w}}, x), np.float64)
  w64 = np.asarray(w, np.float64)
  fq = lambda v: np.asarray(fake_quant(jnp.asarray(v, jnp.float32), act), np.float64)
  # float32 products over 32 terms against float64: atol a few ulps of |x||w|.
  np.testing.assert_allclose(y((Scale(0.5, shift=True), quant)), fq(x + 0.5) @ w64, atol=1e-4)
  np.testing.assert_allclose(y((quant, Scale(0.5, shift=True))), (fq(x) + 0.5) @ w64, atol=1e-4)
  assert np.abs(fq(x + 0.5) - (fq(x) + 0.5)).max() > 1e-2  # The orders really differ.


def test_named_sites_reach_providers_per_block():
  model = Transformer(CFG, Sow())
  params = init(Transformer(CFG))
  _, inter = model.apply({"params": params}, tokens(), mutable=["intermediates"])
  layers = inter["intermediates"]["decoder"]["layers"]
  assert layers["ms_block_out"][0].shape == (3,)  # Stacked on the layer axis by nn.scan.
  assert set(layers["attn"]) == {"ms_query", "ms_key", "ms_value"}
  assert "ms_mlp_hidden" in layers["mlp"] and "ms_embed_out" in inter["intermediates"]


def test_kv_site_fake_quantizes_keys_and_values():
  kv = QuantSpec(bits=4, granularity="token", symmetric=False, calibration="minmax")
  quant = QuantProvider(rules=(QuantRule(pattern="decoder/layers/attn", kv=kv),), mode="fake")
  captured = {}

  @dataclasses.dataclass(frozen=True)
  class Capture(Provider):
    def activation(self, path, name, hooks, module, x):
      if name in ("key", "value"):
        module.sow("intermediates", name, x)
      return x

  params = init(Transformer(CFG))
  for order in ((Capture(), quant), (quant, Capture())):
    _, inter = Transformer(CFG, order).apply({"params": params}, tokens(),
                                             mutable=["intermediates"])
    captured[order[0].__class__.__name__] = inter["intermediates"]["decoder"]["layers"]["attn"]
  raw, quantized = captured["Capture"], captured["QuantProvider"]
  for name in ("key", "value"):
    x = raw[name][0][0]  # Block 0's input to the site (before the quantizer).
    want = fake_quant_ste(x, kv, contract_axis=-1)
    np.testing.assert_array_equal(quantized[name][0][0], want)


# --- per-layer rules under nn.scan --------------------------------------------


def _first_block_at_8_bits():
  return (QuantRule(pattern=r"decoder/layers/.*_proj", layers=frozenset({0}), weight=W8, act=A8),
          QuantRule(pattern=r"decoder/layers/.*_proj", weight=QuantSpec(bits=4),
                    act=QuantSpec(bits=4, granularity="token")))


def _unstack(params, n):
  layers = params["decoder"].pop("layers")
  for i in range(n):
    params["decoder"][f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], layers)
  return params


def test_per_layer_rule_under_scan_equals_the_unscanned_model():
  rules = _first_block_at_8_bits()
  toks = tokens()
  params = init(Transformer(CFG))
  scanned = QuantProvider(rules=rules, mode="fake")
  y_scan = logits(Transformer(CFG, scanned), params, toks)
  unscanned_cfg = dataclasses.replace(CFG, scan_layers=False)
  y_unscan = logits(Transformer(unscanned_cfg, QuantProvider(rules=rules, mode="fake")),
                    _unstack(jax.tree.map(lambda a: a, params), CFG.n_layers), toks)
  # The same quantizers per block; scan vs unrolled programs may round differently.
  np.testing.assert_allclose(y_scan, y_unscan, rtol=1e-5, atol=1e-5)
  all4 = QuantProvider(rules=rules[1:], mode="fake")
  assert np.abs(y_scan - logits(Transformer(CFG, all4), params, toks)).max() > 1e-3
  assert scanned.log.paths["decoder/layers/attn/q_proj"] == (0, 1, 1)
  assert "per block 0:0, 1:1, 2:1" in scanned.report()


def test_per_layer_int8_rule_runs_one_compiled_block():
  rules = (QuantRule(pattern=r"decoder/layers/mlp/down_proj", layers=frozenset({2}),
                     weight=W8, act=A8),)
  model = Transformer(CFG, QuantProvider(rules=rules, mode="int8"))
  toks = tokens()
  params = jax.eval_shape(model.init, jax.random.key(0), toks)["params"]
  counts = count_dots(jax.make_jaxpr(lambda p: model.apply({"params": p}, toks))(
      nn.unbox(params)).jaxpr)
  assert counts[("int8", "int8", "int32")] == 1  # In a switch branch of the one scanned body.


def test_layer_rules_are_validated_against_the_model():
  q = w4a4.get_quant()
  q.rules.linears.layers = "0-7"
  model = ml_collections.ConfigDict(dataclasses.asdict(CFG))
  with pytest.raises(ValueError, match=r"config.quant.rules.linears.layers names block 7"):
    validate_quant(q, model)
  q.rules.linears.layers = "0-x"
  with pytest.raises(ValueError, match=r"config.quant.rules.linears.layers='0-x'"):
    validate_quant(q, model)


def test_quant_rules_override_field_by_field_from_the_command_line(tmp_path):
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  run = lambda *flags: subprocess.run(
      [sys.executable, "-m", "qtrain.train", "--config=configs/default.py:smoke,w4a4",
       f"--workdir={tmp_path}/run", *flags], capture_output=True, text=True, timeout=300)
  bad = run("--config.quant.rules.linears.weight.bits=1")
  assert bad.returncode != 0
  assert "config.quant.rules.linears.weight.bits=1: bits must be in 2..8" in bad.stderr
  q = w4a4.get_quant()
  q.rules.linears.weight.bits = 8  # What the flag sets; the act rule keeps 4 bits.
  rules = validate_quant(q)
  assert rules[0].weight.bits == 8 and rules[0].act.bits == 4
  q.order = ("linears", "nope")
  with pytest.raises(ValueError, match=r"config.quant.order=.*unknown \['nope'\]"):
    validate_quant(q)


# --- observers skip padding; learned steps from data --------------------------


def test_calibration_statistics_skip_padding_tokens():
  toks = tokens(2, 8)
  seg = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3], jnp.int32)
  batch = {"inputs": toks, "segment_ids": seg,
           "positions": jnp.asarray([list(range(8)), list(range(5)) + [0] * 3], jnp.int32)}
  params = init(Transformer(CFG))
  sites, _ = weight_sites(CFG, (QuantRule(pattern="decoder/layers/mlp/down_proj", weight=W8),))
  stats = collect_stats(CFG, params, [batch], sites, ("hessian", "act_scale"))
  # The reference: down_proj's input captured at its named site, real tokens only.
  _, inter = Transformer(CFG, Sow_raw()).apply({"params": params}, toks, batch["positions"],
                                               seg, mutable=["intermediates"])
  h = np.asarray(inter["intermediates"]["decoder"]["layers"]["mlp"]["raw"][0], np.float64)
  real = np.asarray(seg > 0).reshape(-1)
  x = h.reshape(CFG.n_layers, -1, CFG.d_ff)[:, real]
  want = np.einsum("lnk,lnj->lkj", x, x) / real.sum()
  got = np.asarray(stats["decoder/layers/mlp/down_proj"]["hessian"], np.float64)
  # float32 X^T X over 13 rows vs float64: relative 1e-5 of the diagonal.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
  np.testing.assert_allclose(stats["decoder/layers/mlp/down_proj"]["act_scale"],
                             np.abs(x).mean(1), rtol=1e-5)


@dataclasses.dataclass(frozen=True)
class Sow_raw(Provider):  # pylint: disable=invalid-name
  def activation(self, path, name, hooks, module, x):
    if name == "mlp_hidden":
      module.sow("intermediates", "raw", x)
    return x


def test_learned_steps_come_from_real_data_and_the_loaded_weights():
  lsq_w = QuantSpec(bits=4, granularity="channel", calibration="lsq", estimator="lsq")
  lsq_a = QuantSpec(bits=4, granularity="tensor", calibration="lsq", estimator="lsq")
  rules = (QuantRule(pattern="decoder/layers/mlp/down_proj", weight=lsq_w, act=lsq_a),)
  model = Transformer(CFG, QuantProvider(rules=rules, mode="fake"))
  plain = init(Transformer(CFG), tokens(seed=7))  # "Loaded" weights of an unquantized run.
  batch = {"inputs": tokens(4, 8, seed=9)}
  params = calibrate_learned_steps(model, plain, batch)
  assert len(learned_step_paths(params)) == 2
  node = params["decoder"]["layers"]["mlp"]["down_proj"]["dot_general"]
  kernel = np.asarray(plain["decoder"]["layers"]["mlp"]["down_proj"]["kernel"], np.float64)
  # LSQ init (Esser et al. 2020): s0 = 2 mean|w| / sqrt(Q_P) per output channel, Q_P = 7.
  want_w = 2 * np.abs(kernel).mean(axis=1, keepdims=True) / np.sqrt(7)
  np.testing.assert_allclose(node["weight_step"], want_w, rtol=1e-5)
  _, inter = Transformer(CFG, Sow_raw()).apply({"params": plain}, batch["inputs"],
                                               mutable=["intermediates"])
  h = np.asarray(inter["intermediates"]["decoder"]["layers"]["mlp"]["raw"][0], np.float64)
  # Block 0's input is the unquantized model's; later blocks see quantized blocks below.
  want_a = 2 * np.abs(h[0]).mean() / np.sqrt(7)
  np.testing.assert_allclose(np.asarray(node["act_step"]).reshape(-1)[0], want_a, rtol=1e-4)
  for k in plain["decoder"]["layers"]["attn"]:  # Everything else is untouched.
    np.testing.assert_array_equal(params["decoder"]["layers"]["attn"][k]["kernel"],
                                  plain["decoder"]["layers"]["attn"][k]["kernel"])


def test_hp_bwd_backward_dots_run_in_the_compute_dtype_with_float32_accumulation():
  from qtrain.quant import QuantDotGeneral  # pylint: disable=g-import-not-at-top
  dot = QuantDotGeneral(weight=W8, act=A8, mode="int8", int8_backward=False)
  x = jnp.ones((4, 32), jnp.bfloat16)
  w = jnp.ones((32, 16), jnp.bfloat16)
  dn = (((1,), (0,)), ((), ()))
  grad = jax.grad(lambda x, w: jnp.sum(dot.apply({}, x, w, dn).astype(jnp.float32)), (0, 1))
  counts = count_dots(jax.make_jaxpr(grad)(x, w).jaxpr)
  # Forward: one int8 dot; backward (hp_bwd): dX and dW on bf16 operands into float32
  # (they ran float32 x float32 before, twice the bytes and no tensor-core bf16 rate).
  assert counts == {("int8", "int8", "int32"): 1, ("bfloat16", "bfloat16", "float32"): 2}


def test_model_flops_count_the_matmuls_the_model_runs():
  from qtrain.train.metrics import matmul_params  # pylint: disable=g-import-not-at-top
  c = CFG
  attn = c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
  dense = c.n_layers * (attn + 3 * c.d_model * c.d_ff) + c.d_model * c.vocab_size  # By hand.
  assert matmul_params(c) == dense
  assert matmul_params(dataclasses.replace(c, scan_layers=False)) == dense
  low = dataclasses.replace(c, weight_forms=LOW_RANK)  # up, down: in*out -> r*(in+out).
  assert matmul_params(low) == dense - c.n_layers * 2 * (32 * 64 - 4 * (32 + 64))


def test_kv_bits_override_goes_first_for_named_and_sequence_rules():
  from qtrain.quant.config import with_kv_bits  # pylint: disable=g-import-not-at-top
  named = w4a4.get_quant()
  legacy = ml_collections.ConfigDict({"mode": "fake", "order": (),  # An old config.json's rules.
                                      "rules": [named.rules.linears.to_dict()]})
  for q in (named, legacy):
    with_kv_bits(q, 4)
    rules = validate_quant(q)
    assert rules[0].kv.bits == 4 and rules[1].weight.bits == 4 and len(rules) == 2


def test_pallas_switch_sets_kernels_auto_and_needs_int8_mode():
  """``w8a8+pallas`` (what benchmarks/quant_step.py times) routes int8 dots
  through the kernels; on a fake-quant preset the switch is refused by name."""
  from qtrain.quant.config import validate_quant  # pylint: disable=g-import-not-at-top
  assert w8a8.get_quant("pallas").kernels == "auto"
  assert w8a8.get_quant().kernels == "xla"
  validate_quant(w8a8.get_quant("pallas"))
  with pytest.raises(ValueError, match="needs config.quant.mode='int8'"):
    validate_quant(w4a4.get_quant("pallas"))

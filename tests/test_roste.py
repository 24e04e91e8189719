"""RoSTE (issue 15): the rotation provider, the rotated STE, the lower level's
choice, the five methods' configs, and one fine-tune through them.

References: the unrotated model (the rotation is the same function in high
precision); float64 NumPy with Sylvester's Hadamard from scipy and our own
transcription of the asymmetric min/max grid (quantizer.py's docstring) for
the quantized layer, its gradient and RoSTE's E; ``python -m qtrain.quantize``'s
RTN for the PTQ evaluation.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from qtrain.config.validate import validate
from qtrain.config.variants import config_module
from qtrain.layers import Hooks, MatmulSite, ModelConfig, Provider, Transformer
from qtrain.quant import QuantProvider, QuantRule, QuantSpec
from qtrain.quant.config import provider_from_config, rotation_table, validate_quant
from qtrain.quant import roste
from qtrain.quant.rotated import RotationProvider, site_signs

ROOT = os.path.join(os.path.dirname(__file__), "..")
BASE = config_module("roste._base")
LINEARS = BASE.LINEARS
METHODS = {"sft_rtn": ("ptq", ""), "sft_quarot": ("ptq", "all"), "ste": ("qat", ""),
           "ste_rotate_all": ("qat", "all"), "roste": ("qat", "roste")}
# d_ff 96 = 12 x 8: Paley I x Sylvester, so a non-power-of-two transform runs too.
TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                   d_ff=96, init_std=0.15, max_seq_len=32)
ASYM4 = QuantSpec(bits=4, symmetric=False, granularity="token", calibration="minmax")
ASYM4_W = dataclasses.replace(ASYM4, granularity="channel")


def _tokens(rows=3, t=16, seed=0):
  return jax.random.randint(jax.random.key(seed), (rows, t), 0, TINY.vocab_size)


def _init(cfg):
  return nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(1), _tokens())["params"])


def _logits(model, params, tokens):
  return jax.jit(model.apply)({"params": params}, tokens)


# --- float64 references -------------------------------------------------------


def fq_np(x, axis, bits=4, clip=1.0):
  """Asymmetric min/max fake quantization, float64, the range shrunk by ``clip``:
  s = (hi - lo) / (2^b - 1), z = round(-lo / s), q = clip(round(x / s) + z)."""
  qp = 2.0 ** bits - 1
  lo = np.minimum(x.min(axis=axis, keepdims=True), 0.0) * clip
  hi = np.maximum(x.max(axis=axis, keepdims=True), 0.0) * clip
  s = (hi - lo) / qp
  s = np.where(s > np.sqrt(np.finfo(np.float32).tiny), s, 1.0)
  z = np.clip(np.round(-lo / s), 0, qp)
  return (np.clip(np.round(x / s) + z, 0, qp) - z) * s


def rotation_np(n, signs):
  """R = diag(s) H / sqrt(n), H Sylvester's (scipy), float64."""
  return np.asarray(signs, np.float64)[:, None] * scipy.linalg.hadamard(n) / np.sqrt(n)


# --- 1. the provider: same function unquantized, per block, under scan -------


@pytest.mark.parametrize("scan", [True, False])
def test_rotation_leaves_the_unquantized_model_unchanged(scan):
  cfg = dataclasses.replace(TINY, scan_layers=scan)
  params, tokens = _init(cfg), _tokens()
  plain = _logits(Transformer(cfg), params, tokens)
  table = (("decoder/layers/attn/q_proj", (True, False)),
           ("decoder/layers/mlp/down_proj", (False, True)))
  rotations = [RotationProvider(pattern=LINEARS, table=table, seed=3)]
  if scan:  # Every block on: no lax.cond.
    rotations.append(RotationProvider(pattern=LINEARS, seed=3))
  for rot in rotations:
    out = _logits(Transformer(cfg, rot), params, tokens)
    # float32: the transforms are a few adds and one 12x12 matmul per vector (HIGHEST).
    np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-5 * float(jnp.abs(plain).max()))


class _Operands(Provider):
  """Records what the dot below the rotation receives, per block."""

  def dot(self, site, hooks, inner):
    def seen(module, lhs, rhs, dims, precision=None, preferred_element_type=None):
      module.sow("intermediates", "rhs", rhs)
      return inner(module, lhs, rhs, dims, precision, preferred_element_type)
    return seen if site.path == "decoder/layers/mlp/down_proj" else inner


def test_the_table_rotates_exactly_the_blocks_it_names_under_scan():
  params, tokens = _init(TINY), _tokens()
  table = (("decoder/layers/mlp/down_proj", (False, True)),)
  model = Transformer(TINY, Hooks(providers=(RotationProvider(
      pattern=r"decoder/layers/mlp/down_proj", table=table, seed=5), _Operands())))
  # Compiled: op by op, every small op of the model compiles on its own.
  _, state = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))(
      {"params": params}, tokens)
  rhs = np.asarray(state["intermediates"]["decoder"]["layers"]["mlp"]["down_proj"]
                   ["dot_general"]["rhs"][0], np.float64)  # [L, 96, 32] after the rotation.
  w = np.asarray(params["decoder"]["layers"]["mlp"]["down_proj"]["kernel"], np.float64)
  np.testing.assert_array_equal(rhs[0], w[0])  # Block 0: off, untouched.
  signs = site_signs(5, "decoder/layers/mlp/down_proj", 96, 2)[1]
  from qtrain.layers.rotation import rotation_matrix  # R1's dense R; H H^T = n I is its test.
  r = rotation_matrix(96, signs)
  np.testing.assert_allclose(rhs[1], r.T @ w[1], rtol=0, atol=1e-5)  # Block 1: R^T W.


# --- 2. the rotated STE ------------------------------------------------------


def test_rotated_ste_gradient_is_r_times_the_ste_gradient_at_the_rotated_weight():
  n, m, rows = 16, 5, 7
  rng = np.random.default_rng(0)
  x = rng.normal(size=(rows, n)).astype(np.float32)
  x[:, 3] *= 20.0  # An outlier channel: what the rotation spreads.
  w = rng.normal(size=(n, m)).astype(np.float32) * 0.1
  g = rng.normal(size=(rows, m)).astype(np.float32)
  site = MatmulSite(path="lin", param=("lin", "kernel"), in_features=n, out_features=m)
  rule = QuantRule(pattern="lin", weight=ASYM4_W, act=ASYM4)
  dims = (((1,), (0,)), ((), ()))

  def loss(x, w, rotation):
    fn = Hooks(providers=(QuantProvider(rules=(rule,), rotation=rotation),)).dot_fn(site)
    return jnp.sum(fn(None, x, w, dims) * g)

  rot = RotationProvider(pattern="lin", seed=11)
  # Compiled (the provider is static): op by op, each quantizer op compiles alone.
  y = jax.jit(Hooks(providers=(QuantProvider(rules=(rule,), rotation=rot),)).dot_fn(site),
              static_argnums=(0, 3))(None, x, w, dims)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  dx, dw = grad(x, w, rot)

  r = rotation_np(n, site_signs(11, "lin", n, 1)[0])
  xr, wr = x.astype(np.float64) @ r, r.T @ w.astype(np.float64)
  qx, qw = fq_np(xr, axis=1), fq_np(wr, axis=0)
  # Forward: Q_x(X R) Q_w(R^T W); float32 vs float64 numerics, no code flips at this seed.
  np.testing.assert_allclose(y, qx @ qw, rtol=1e-5, atol=1e-5)
  # Backward, STE through both quantizers, then through the rotations (RoSTE):
  # dL/dW = R (Q_x(X R))^T G, dL/dX = G Q_w(R^T W)^T R^T.
  np.testing.assert_allclose(dw, r @ (qx.T @ g), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, (g @ qw.T) @ r.T, rtol=1e-5, atol=1e-5)
  # The formula itself: R times the plain STE gradient taken at the rotated weight.
  _, dwr = grad(jnp.asarray(xr, jnp.float32), jnp.asarray(wr, jnp.float32), None)
  np.testing.assert_allclose(dw, r @ np.asarray(dwr, np.float64), rtol=1e-5, atol=1e-5)


# --- 3. the lower level ------------------------------------------------------


class _Inputs(Provider):
  """Sows each matmul's raw input, to recompute E by hand."""

  def dot(self, site, hooks, inner):
    def seen(module, lhs, rhs, dims, precision=None, preferred_element_type=None):
      module.sow("intermediates", "x", lhs)
      return inner(module, lhs, rhs, dims, precision, preferred_element_type)
    return seen


def _quant_cfg(clip=0.9):
  c = BASE.quant(clip, rotate="roste")
  c.rotation.seed = 7
  return c


def test_lower_level_reproduces_hand_computed_e_and_its_choice():
  params = jax.tree.map(np.array, _init(TINY))
  # Outliers on channel 5 of block 0's attention input: rotating q/k/v there must win.
  params["decoder"]["layers"]["attn_norm"]["scale"][0, 5] = 40.0
  tokens = _tokens(rows=4, t=16, seed=2)
  segments = np.ones((4, 16), np.int32)
  segments[1, 10:] = 0  # Padding: left out of the activation term.
  batch = {"inputs": tokens, "positions": jnp.broadcast_to(jnp.arange(16), (4, 16)),
           "segment_ids": jnp.asarray(segments)}
  quant = _quant_cfg()
  errors = roste.rotation_errors(TINY, quant, params, [batch, batch])

  _, state = jax.jit(functools.partial(Transformer(TINY, _Inputs()).apply,
                                       mutable=["intermediates"]))(
      {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
  mask = segments.astype(bool)
  hand = {}
  for path in ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj",
               "mlp/up_proj", "mlp/down_proj"):
    module, name = path.split("/")
    xs = np.asarray(state["intermediates"]["decoder"]["layers"][module][name]["dot_general"]
                    ["x"][0], np.float64)  # [L, B, T, n]
    ws = np.asarray(params["decoder"]["layers"][module][name]["kernel"], np.float64)
    full = f"decoder/layers/{path}"
    n = ws.shape[1]
    e = {"identity": [], "hadamard": []}
    for layer in range(TINY.n_layers):
      x, w = xs[layer][mask], ws[layer]  # Real tokens only.
      r = (rotation_np(n, site_signs(7, full, n, TINY.n_layers)[layer]) if n & (n - 1) == 0
           else None)
      if r is None:  # d_ff = 96: R1's dense R (H H^T = n I is tested in test_rotation).
        from qtrain.layers.rotation import rotation_matrix
        r = rotation_matrix(n, site_signs(7, full, n, TINY.n_layers)[layer])
      for kind, rr in (("identity", np.eye(n)), ("hadamard", r)):
        xr, wr = x @ rr, rr.T @ w
        e_w = np.sum((fq_np(wr, 0, clip=0.9) - wr) ** 2)
        e_x = np.sum((fq_np(xr, 1, clip=0.9) - xr) ** 2) / 4  # Mean over the 4 rows (samples).
        e[kind].append(e_w + e_x)
    hand[full] = e
  assert set(errors) == set(hand)
  for path in hand:
    for kind in ("identity", "hadamard"):
      # float32 quantizers and sums of ~10^3 squared errors against float64.
      np.testing.assert_allclose(errors[path][kind], hand[path][kind], rtol=2e-4,
                                 err_msg=f"{path} {kind}")
  table = roste.choose(errors)
  want = {p: "".join("1" if h < i else "0" for i, h in zip(e["identity"], e["hadamard"]))
          for p, e in hand.items()}
  assert table == want
  assert table["decoder/layers/attn/q_proj"][0] == "1"  # The outlier block.
  assert "0" in "".join(table.values())  # A mixed choice: both branches of the table run.


# --- 4. config ----------------------------------------------------------------


def test_rotation_config_errors_name_the_field():
  cfg = config_module("roste.roste").get_config("smoke")
  with pytest.raises(ValueError, match=r"config.quant.rotation.choose='roste'.*finetune"):
    provider_from_config(cfg.quant, cfg.model)
  cfg.quant.rotation.update(choose="table", table={"decoder/layers/attn/q_proj": "10"})
  with pytest.raises(ValueError, match=r"config.quant.rotation.table has no entry for"):
    validate_quant(cfg.quant, cfg.model)
  paths = ["attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj",
           "mlp/up_proj", "mlp/down_proj"]
  cfg.quant.rotation.table = {f"decoder/layers/{p}": "10" for p in paths}
  validate_quant(cfg.quant, cfg.model)
  assert dict(rotation_table(cfg.quant.rotation))["decoder/layers/attn/q_proj"] == (True, False)
  cfg.quant.rotation.table["decoder/layers/attn/q_proj"] = "101"
  with pytest.raises(ValueError, match=r"table\['decoder/layers/attn/q_proj'\] has 3 entries"):
    validate_quant(cfg.quant, cfg.model)
  cfg.quant.rotation.table["decoder/layers/attn/q_proj"] = "1x"
  with pytest.raises(ValueError, match=r"one 0/1 per block"):
    validate_quant(cfg.quant, cfg.model)
  cfg = config_module("roste.ste_rotate_all").get_config("smoke")
  cfg.model.d_ff = 52  # No Hadamard matrix of order 52 here.
  with pytest.raises(ValueError, match=r"config.quant.rotation.sites=.*mlp/down_proj.*52"):
    validate_quant(cfg.quant, cfg.model)
  cfg.quant.stage = "later"
  with pytest.raises(ValueError, match=r"config.quant.stage='later'"):
    validate_quant(cfg.quant)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_file_builds_validates_and_differs_only_in_stage_and_rotation(name):
  path = os.path.join(ROOT, "configs", "roste", f"{name}.py")
  doc = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read()))
  assert f"--config=configs/roste/{name}.py" in doc and "configs/roste/_base.py" in doc
  for variant in ("", "smoke", "125m", "c90", "smoke,c95"):
    cfg = config_module(f"roste.{name}").get_config(variant)
    validate(cfg, 1)
  stage, rotate = METHODS[name]
  cfg = config_module(f"roste.{name}").get_config("")
  ref = config_module("roste.ste").get_config("").to_dict()
  got = cfg.to_dict()
  assert (got["quant"]["stage"], got["quant"]["rotation"]["choose"] if
          got["quant"]["rotation"]["sites"] else "") == (stage, rotate)
  got["quant"]["stage"], got["quant"]["rotation"] = ref["quant"]["stage"], ref["quant"]["rotation"]
  assert got == ref
  c90 = config_module(f"roste.{name}").get_config("c90").quant.rules.linears
  assert tuple(c90.weight.mse_grid) == (0.9,) and tuple(c90.act.mse_grid) == (0.9,)


def test_every_file_in_the_folder_is_a_method():
  names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs", "roste"))
                 if f.endswith(".py") and not f.startswith("_"))
  assert names == sorted(METHODS)


# --- 5. a fine-tune through finetune's steps, and the PTQ evaluation --------


def test_lower_level_records_its_choice_and_the_run_evaluates_with_it(smoke_run_dir, smoke_run,
                                                                     tmp_path):
  from qtrain import eval as eval_lib  # pylint: disable=g-import-not-at-top
  from conftest import DATA  # pylint: disable=g-import-not-at-top
  cfg = config_module("roste.roste").get_config("smoke")
  cfg.data.dir = str(DATA)
  cfg.train.init_from = str(smoke_run_dir)
  workdir = str(tmp_path / "roste")
  table = roste.choose_rotations(cfg, workdir)  # What python -m qtrain.finetune runs first.
  with open(os.path.join(workdir, "roste_rotations.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["table"] == table == roste.choose(saved["errors"])
  assert saved["samples"] == cfg.data.global_batch_size  # calib_batches = 1 at smoke size.
  assert roste.choose_rotations(cfg, workdir) == table  # A resumed run keeps its choice.
  # The table in config.json is what the model runs: the loop's evaluation
  # (build_model of config.json, as for a QAT run) equals quantized_eval.
  cfg.quant.rotation.table = table
  path = smoke_run / "config.json"
  saved_cfg = json.loads(path.read_text())
  saved_cfg["quant"] = cfg.quant.to_dict()
  path.write_text(json.dumps(saved_cfg))
  ours = roste.quantized_eval(str(smoke_run))
  assert ours["loss"] == pytest.approx(eval_lib.run(str(smoke_run))["eval_loss"], rel=1e-6)


def test_ptq_stage_evaluation_is_rtn_as_qtrain_quantize_computes_it(smoke_run):
  from qtrain.quantize import __main__ as ptq  # pylint: disable=g-import-not-at-top
  from qtrain.quantize.evaluate import load_recipe  # pylint: disable=g-import-not-at-top
  path = smoke_run / "config.json"
  cfg = json.loads(path.read_text())
  cfg["quant"] = load_recipe("w4a4kv4").to_dict()
  cfg["quant"]["stage"] = "ptq"
  path.write_text(json.dumps(cfg))
  ours = roste.quantized_eval(str(smoke_run))
  theirs = ptq.run(str(smoke_run), "w4a4kv4", "rtn", out=str(smoke_run / "ptq"))
  assert ours["loss"] == pytest.approx(theirs["nll_ptq"], rel=1e-6)
  assert abs(theirs["nll_ptq"] - theirs["nll_fp"]) > 1e-4  # The quantizers did something.

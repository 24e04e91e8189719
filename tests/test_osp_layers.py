"""Outlier-safe pretraining's layers (Park et al. 2025): Single-Scale RMSNorm,
EmbProj, the online FFN Hadamard, and their merge into a plain Llama.

References: float64 NumPy (the norm's formula, ``scipy.linalg.hadamard``),
the unmerged model itself (a merge or fold must not change logits), HF
``transformers`` (the merged export is a plain Llama), the full forward
(cached decoding), the one-device loss (a mesh with fsdp x tensor).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch
import transformers

from qtrain.convert import params_to_hf_state_dict
from qtrain.convert.osp import merge_osp
from qtrain.layers import FormRule, ModelConfig, Transformer, trace_sites
from qtrain.layers.hadamard import fold_ffn_hadamard
from qtrain.layers.hadamard import fwht as fwht_eager
from qtrain.layers.kv_cache import init_cache
from qtrain.layers.norms import RMSNorm, SSNorm
from qtrain.train.sample import decode

torch.set_num_threads(1)

V = 128
# d_ff a power of two (the FFN Hadamard); init_std well above 0.02 so that a
# wrong merge moves logits by O(1), not by less than the tolerance.
PLAIN = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=64, init_std=0.15, max_seq_len=64)
OSP = dataclasses.replace(PLAIN, norm="ssnorm", embproj=True, ffn_hadamard=True)


def random_params(cfg: ModelConfig, seed: int = 0):
  """Params of ``cfg``'s shapes from the host rng: weights N(0, init_std),
  norm gains 1 + 0.3 N(0, 1) (scalars for ssnorm), EmbProj matrices random
  orthogonal (as initialised) times 1 + 0.3 N(0, 1) per column, so they are
  not orthogonal any more and a merge cannot pass by accident."""
  shapes = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                                   jnp.zeros((1, 8), jnp.int32)))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, s):
    key = jax.tree_util.keystr(path)
    if key.endswith("['scale']"):
      return jnp.asarray(1 + 0.3 * rng.standard_normal(s.shape), s.dtype)
    if "_proj']['kernel']" in key and key.startswith(("['embed_proj']", "['head_proj']")):
      q = np.linalg.qr(rng.standard_normal(s.shape))[0]
      return jnp.asarray(q * (1 + 0.3 * rng.standard_normal(s.shape[-1])), s.dtype)
    return jnp.asarray(cfg.init_std * rng.standard_normal(s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.partial(jax.jit, static_argnums=0)
def logits(cfg, params, tokens_BT):
  return Transformer(cfg).apply({"params": params}, tokens_BT)


# Compiled, as the model runs it: op by op, each op of each butterfly stage
# compiles on its own (seconds for n = 256).
fwht = jax.jit(fwht_eager)


def tokens(shape=(2, 16), seed=1):
  return np.random.default_rng(seed).integers(0, V, shape, dtype=np.int32)


# --- FFN Hadamard -------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 8, 256])
def test_fwht_equals_scipy_hadamard(n):
  x = np.random.default_rng(n).standard_normal((3, 5, n)).astype(np.float32)
  want = x.astype(np.float64) @ (scipy.linalg.hadamard(n) / np.sqrt(n))
  got = np.asarray(fwht(jnp.asarray(x)))
  # float32 butterflies: log2(n) <= 8 rounded adds per entry of |x H| ~ 1, i.e.
  # ~8 * 2^-24 ~ 5e-7; measured 4.0e-7 at n=512 (6e-7 for H H x = x).
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  np.testing.assert_allclose(np.asarray(fwht(fwht(jnp.asarray(x)))), x, rtol=0, atol=4e-6)


def test_fwht_dtype_and_size_errors():
  x = jnp.ones((2, 16), jnp.bfloat16)
  assert fwht(x).dtype == jnp.bfloat16  # float32 inside, the caller's dtype out.
  np.testing.assert_array_equal(np.asarray(fwht(x), np.float32)[:, 1:], 0.0)
  with pytest.raises(ValueError, match="power-of-two size; the last axis has 12"):
    fwht_eager(jnp.ones((2, 12)))
  with pytest.raises(ValueError, match="power-of-two size; the last axis has 12"):
    fwht(jnp.ones((2, 12)))  # At trace time, so under jit too.


# --- Single-Scale RMSNorm -----------------------------------------------------


def test_ssnorm_equals_float64_formula():
  x = np.random.default_rng(0).standard_normal((2, 5, 48)).astype(np.float32) * 3.0
  s = np.float32(1.7)
  want = x.astype(np.float64) / np.sqrt(np.mean(np.square(x.astype(np.float64)), -1,
                                                keepdims=True) + 1e-5) * s
  got = SSNorm(1e-5).apply({"params": {"scale": jnp.asarray(s)}}, jnp.asarray(x))
  # float32 mean of 48 squares and an rsqrt: a few ulps of O(1) outputs.
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=2e-6)
  variables = SSNorm().init(jax.random.key(0), jnp.asarray(x))
  assert variables["params"]["scale"].value.shape == ()  # Boxed: logical axes ().
  assert variables["params"]["scale"].names == ()
  assert float(variables["params"]["scale"].value) == 1.0
  # The per-channel RMSNorm with every gain = s is the same function.
  per_channel = RMSNorm(1e-5).apply({"params": {"scale": jnp.full((48,), s)}}, jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(per_channel), np.asarray(got))


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscanned"])
def test_every_norm_follows_config(scan):
  cfg = dataclasses.replace(OSP, scan_layers=scan)
  boxed = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(
      boxed["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]}
  norms = {k: v for k, v in flat.items() if k.endswith("['scale']")}
  assert len(norms) == (3 if scan else 5)  # final + attn/mlp per block (stacked or not).
  for key, box in norms.items():
    stacked = scan and "decoder" in key
    assert box.value.shape == ((cfg.n_layers,) if stacked else ()), key
    assert box.names == (("layers",) if stacked else ()), key


# --- EmbProj ------------------------------------------------------------------


def test_embproj_params_sites_and_default_quant_rules():
  from qtrain.quant import validate_quant  # pylint: disable=g-import-not-at-top
  from qtrain.quantize.evaluate import load_recipe  # pylint: disable=g-import-not-at-top
  from qtrain.quantize.rtn import weight_sites  # pylint: disable=g-import-not-at-top
  model = Transformer(OSP)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  for name in ("embed_proj", "head_proj"):
    box = variables[name]["kernel"]
    assert box.names == ("embed", "embed_proj")
    p = np.asarray(box.value, np.float64)
    np.testing.assert_allclose(p @ p.T, np.eye(OSP.d_model), atol=1e-5)  # Orthogonal init.
  paths = [s.path for s in trace_sites(model).matmuls]
  assert paths[0] == "embed_proj" and paths[-2:] == ["head_proj", "lm_head"]
  # The presets' rules name the block matmuls (and, with +lm_head, exactly
  # "lm_head"): EmbProj stays in high precision, as does the head by default.
  for recipe, head in (("w4a4kv4", False), ("w4a4kv4+lm_head", True)):
    quant = load_recipe(recipe)
    sites, _ = weight_sites(OSP, validate_quant(quant, OSP))
    got = {s.path for s in sites}
    assert "embed_proj" not in got and "head_proj" not in got
    assert ("lm_head" in got) == head and len(got) == 7 + head


# --- merges -------------------------------------------------------------------

# Merged and unmerged compute the same real function with float32 products
# taken in another order ((x P) W vs x (P W), (h H) W vs h (H W)): a few ulps
# of logits with |max| ~3.4, std ~0.9. Measured max |diff|: merge 1.9e-6
# (scanned untied and unscanned tied), Hadamard fold 1.5e-6, HF transformers
# vs the unmerged model 1.4e-6; 2e-5 leaves 10x.
MERGE_ATOL = 2e-5


@pytest.mark.parametrize("scan,tied", [(True, False), (False, True)],
                         ids=["scan-untied", "unscanned-tied"])
def test_merge_osp_keeps_logits(scan, tied):
  cfg = dataclasses.replace(OSP, scan_layers=scan, tie_embeddings=tied)
  params = random_params(cfg)
  merged, plain = merge_osp({"params": params}, cfg)
  assert (plain.norm, plain.embproj, plain.ffn_hadamard) == ("rmsnorm", False, False)
  assert plain.tie_embeddings is False  # Tied + EmbProj merges exactly only untied.
  assert "embed_proj" not in merged and "head_proj" not in merged
  assert merged["final_norm"]["scale"].shape == (cfg.d_model,)
  want = np.asarray(logits(cfg, params, tokens()))
  got = np.asarray(logits(plain, merged, tokens()))
  assert np.abs(want).max() > 1.0  # Logits of O(1), so MERGE_ATOL is a few ulps.
  np.testing.assert_allclose(got, want, rtol=0, atol=MERGE_ATOL)
  # Each piece matters here: dropping the EmbProj merge or the Hadamard fold
  # moves the logits far beyond the tolerance.
  no_embproj = dict(merged, embedding=params["embedding"])
  assert np.abs(np.asarray(logits(plain, no_embproj, tokens())) - want).max() > 100 * MERGE_ATOL
  with_h = dataclasses.replace(plain, ffn_hadamard=True)
  assert np.abs(np.asarray(logits(with_h, merged, tokens())) - want).max() > 100 * MERGE_ATOL


def test_merged_export_loads_in_transformers():
  cfg = dataclasses.replace(OSP, scan_layers=True)
  params = random_params(cfg, seed=3)
  _, plain = merge_osp(params, cfg)
  state_dict = params_to_hf_state_dict({"params": params}, cfg)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=V, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim, intermediate_size=cfg.d_ff, max_position_embeddings=64,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      tie_word_embeddings=plain.tie_embeddings, rms_norm_eps=cfg.norm_eps,
      attn_implementation="eager")
  model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                        strict=True)
  with torch.no_grad():
    hf = model(torch.from_numpy(tokens()).long()).logits.numpy()
  # float32 in both frameworks, accumulation order apart (as the merge above).
  np.testing.assert_allclose(hf, np.asarray(logits(cfg, params, tokens())), rtol=0,
                             atol=MERGE_ATOL)


def test_fold_ffn_hadamard_keeps_logits_and_refuses_twice():
  params = random_params(PLAIN, seed=5)
  folded, cfg = fold_ffn_hadamard({"params": params}, PLAIN)
  assert cfg.ffn_hadamard and not PLAIN.ffn_hadamard
  want = np.asarray(logits(PLAIN, params, tokens()))
  np.testing.assert_allclose(np.asarray(logits(cfg, folded, tokens())), want, rtol=0,
                             atol=MERGE_ATOL)
  assert np.abs(np.asarray(logits(cfg, params, tokens())) - want).max() > 100 * MERGE_ATOL
  with pytest.raises(ValueError, match="ffn_hadamard is already True"):
    fold_ffn_hadamard(folded, cfg)
  low_rank = dataclasses.replace(PLAIN, weight_forms=(FormRule(
      pattern=r"decoder/layers/mlp/down_proj", form="low_rank", options=(("rank", 4),)),))
  with pytest.raises(ValueError, match=r"decoder/layers/mlp/down_proj holds \['a', 'b'\], "
                                       "not a dense kernel"):
    fold_ffn_hadamard(random_params(low_rank), low_rank)


# --- decoding -----------------------------------------------------------------


def test_cached_decoding_equals_full_forward():
  cfg = dataclasses.replace(OSP, scan_layers=True)
  model = Transformer(cfg)
  params = random_params(cfg, seed=2)
  tokens_BT = jnp.asarray(tokens((2, 12), seed=4))
  want = np.asarray(logits(cfg, params, tokens_BT))
  step = jax.jit(decode, static_argnums=0)
  cache = init_cache(model, 2, 12)
  positions_BT = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
  outs = []
  out, cache = step(model, params, cache, tokens_BT[:, :5], positions_BT[:, :5])
  outs.append(out)
  for t in range(5, 12):
    out, cache = step(model, params, cache, tokens_BT[:, t:t + 1], positions_BT[:, t:t + 1])
    outs.append(out)
  # As tests/test_generate.py: float32 on both paths, accumulation order apart.
  np.testing.assert_allclose(np.concatenate(outs, axis=1), want, rtol=0, atol=2e-5)


# --- config checks ------------------------------------------------------------


def _smoke(**model):
  from configs import default  # pylint: disable=g-import-not-at-top
  cfg = default.get_config("smoke")
  cfg.model.update(**model)
  return cfg


def test_config_errors_name_the_field_and_the_fix():
  from qtrain.config import ConfigError, validate  # pylint: disable=g-import-not-at-top
  validate(_smoke(norm="ssnorm", embproj=True, ffn_hadamard=True, d_ff=128))
  with pytest.raises(ConfigError, match=r"config.model.ffn_hadamard=True needs config.model.d_ff "
                                        r"a power of two .* got 160; set d_ff=128 or 256"):
    validate(_smoke(ffn_hadamard=True))
  with pytest.raises(ConfigError, match=r"config.model.norm='layernorm'; use one of "
                                        r"\('rmsnorm', 'ssnorm'\)"):
    validate(_smoke(norm="layernorm"))


# --- a mesh with fsdp x tensor ------------------------------------------------


def test_osp_model_on_fsdp_tensor_mesh_equals_one_device():
  from jax.sharding import PartitionSpec  # pylint: disable=g-import-not-at-top
  from parallel_util import (Run, assert_matches_one_device, batch,  # pylint: disable=g-import-not-at-top
                             smoke_config)
  osp = dict(norm="ssnorm", embproj=True, ffn_hadamard=True, d_ff=128)
  one, mesh = smoke_config(), smoke_config(data=2, fsdp=2, tensor=2)
  for cfg in (one, mesh):
    cfg.model.update(**osp)
  ref = Run(one)
  params = ref.init_state().params
  run = Run(mesh)
  for name in ("embed_proj", "head_proj"):  # Rows over fsdp, the second d whole.
    assert run.state_sh.params[name]["kernel"].spec == PartitionSpec("fsdp", None)
  loss, grads, _ = run.loss_and_grads(params, batch())
  ref_loss, ref_grads, _ = ref.loss_and_grads(params, batch())
  assert_matches_one_device(loss, grads, ref_loss, ref_grads)


# --- python -m qtrain.quantize --ffn_hadamard -----------------------------------


@pytest.mark.slow
def test_quantize_flag_folds_the_hadamard_and_keeps_the_unquantized_model(tmp_path):
  """RTN W4A4 of one trained smoke model with and without --ffn_hadamard:
  the unquantized perplexity is the same function's, the PTQ one differs
  (the down_proj input the quantizer rounds is rotated)."""
  import conftest  # pylint: disable=g-import-not-at-top
  from qtrain.quantize.__main__ import run as ptq  # pylint: disable=g-import-not-at-top
  from qtrain.train.loop import run as train  # pylint: disable=g-import-not-at-top
  # One step of one layer on short rows: the fold is per layer and the
  # checkpoint only has to be a trained run's; each compile is what costs.
  cfg = conftest.smoke_config(steps=1, checkpoint_every=1)
  cfg.model.update(d_ff=128, n_layers=1)
  cfg.data.update(seq_len=16, eval_batches=1)
  train(cfg, str(tmp_path / "run"))
  plain = ptq(str(tmp_path / "run"), "w4a4", "rtn")
  rotated = ptq(str(tmp_path / "run"), "w4a4", "rtn", ffn_hadamard=True)
  assert rotated["out"].endswith("ptq_w4a4_rtn_ffnh") and rotated["ffn_hadamard"]
  # Same function in float32, reassociated: measured equal to the last digit
  # (nll 9.037; 8.964 with 2 steps of 2 layers); switching H on without
  # folding H W moved it 1.4e-3 relative.
  assert rotated["nll_fp"] == pytest.approx(plain["nll_fp"], rel=1e-5)
  assert rotated["nll_ptq"] != plain["nll_ptq"]
  from qtrain.quantize.export import read_meta  # pylint: disable=g-import-not-at-top
  assert read_meta(rotated["out"])["model"]["ffn_hadamard"] is True
  with pytest.raises(ValueError, match="--ffn_hadamard needs config.model.d_ff a power of two"):
    from qtrain.quantize.__main__ import _with_ffn_hadamard  # pylint: disable=g-import-not-at-top
    _with_ffn_hadamard(conftest.smoke_config())

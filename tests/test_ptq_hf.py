"""PTQ exports -> Hugging Face (``python -m qtrain.convert export --ptq``),
transformers the reference.

A tiny random Llama (scanned, untied) and Qwen2 (unscanned, tied, non-zero
q/k/v biases) are quantized as ``python -m qtrain.quantize`` does (RTN, AWQ;
``save_quantized`` with the CLI's ptq.json fields), exported, and loaded by
``transformers.AutoModelForCausalLM``: its float32 logits must equal those of
qtrain's PTQ model (``load_quantized`` params, the recipe's evaluation
providers: what ``qtrain.quantize`` scores) within 1e-4. Both sides then run
the same float32 weights (tested bit-equal below), so only the accumulation
order of matmuls and reductions differs: ~1e-6 on logits of |max| ~5 here
(measured 1.4e-6..2.7e-6 here, int and float forms, AWQ included), while quantizing the
weights moves the logits by > 1e-2 (asserted, so the bound can tell a
quantized model from the float one).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from transformers.integrations import gemma_quant

from hf_util import hf_logits
from qtrain.convert import fuse_rotations, params_to_hf_state_dict, rotated_config
from qtrain.convert.__main__ import _model_block, main
from qtrain.convert.ptq_hf import pack_codes
from qtrain.layers import ModelConfig, Transformer
from qtrain.quant import validate_quant
from qtrain.quantize import (load_quantized, ptq_providers, quantize_params,
                             save_quantized, weight_sites)
from qtrain.quantize import evaluate as ev

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

LOGIT_ATOL = 1e-4
QUANT_MOVES = 1e-2  # Weight quantization's least effect on these logits (measured ~0.1..1).
V, B, T = 128, 2, 16
LLAMA = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=64, max_seq_len=32)
QWEN2 = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=64, max_seq_len=32, qkv_bias=True, tie_embeddings=True,
                    scan_layers=False, rope_theta=1e6, norm_eps=1e-6)
TOKENS = np.random.default_rng(1).integers(0, V, (B, T), dtype=np.int32)


@functools.cache
def _random_params(cfg: ModelConfig, seed: int = 0):
  """Weights N(0, 0.15), norm gains 1 + 0.3 N(0, 1), biases N(0, 0.5) (as
  hf_util.randomize): a wrong mapping or a missed quantizer moves logits O(1)."""
  params = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(seed),  # No compile.
                                   jnp.zeros((1, 8), jnp.int32))["params"])
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      return jnp.asarray(1.0 + 0.3 * rng.standard_normal(x.shape), x.dtype)
    return jnp.asarray((0.5 if "bias" in name else 0.15) * rng.standard_normal(x.shape), x.dtype)
  return jax.tree_util.tree_map_with_path(draw, params)


_SHARED_INPUT = {"q_proj": "attn_norm", "k_proj": "attn_norm", "v_proj": "attn_norm",
                 "gate_proj": "mlp_norm", "up_proj": "mlp_norm"}


def _awq_stats(cfg, sites):
  """AWQ's calibration statistic, mean |x| per input channel [L, in]:
  positive, one per matmul input (q/k/v read the attention norm's output,
  gate/up the MLP norm's), drawn instead of summed over batches (a compile
  this file does not need: test_ptq checks the statistics)."""
  rng = np.random.default_rng(3)
  by_input = {}
  for s in sites:
    name = s.path.rsplit("/", 1)[1]
    if _SHARED_INPUT.get(name, name) not in by_input:
      n_in = cfg.d_ff if name == "down_proj" else cfg.n_heads * cfg.head_dim if name == "o_proj" \
          else cfg.d_model
      by_input[_SHARED_INPUT.get(name, name)] = jnp.asarray(
          np.exp(rng.normal(size=(cfg.n_layers, n_in))), jnp.float32)
  return {s.path: {"act_scale": by_input[_SHARED_INPUT.get(n, n)]}
          for s in sites for n in [s.path.rsplit("/", 1)[1]]}


def _export(tmp_path, cfg, params, recipe_name: str, method: str = "rtn", bits: int | None = None,
            granularity: str | None = None):
  """A PTQ export as qtrain.quantize writes it; returns (its dir, its recipe)."""
  recipe = ev.load_recipe(recipe_name)
  if bits is not None:
    recipe.rules.linears.weight.bits = bits
  if granularity is not None:
    recipe.rules.linears.weight.granularity = granularity
  block = _model_block(cfg)
  sites, _ = weight_sites(cfg, validate_quant(recipe, ml_collections.ConfigDict(block)))
  stats = None
  if method == "awq":
    stats = _awq_stats(cfg, sites)
  # One compiled program instead of op by op (each op compiles alone on first
  # use); the codes are saved, so both sides of every comparison read the same.
  qw = jax.jit(lambda p, st: quantize_params(method, p, sites, st))(params, stats)
  out = tmp_path / f"ptq_{recipe_name}_{method}{bits or ''}"
  save_quantized(str(out), params, qw, sites, {
      "recipe": recipe_name, "method": method, "method_kwargs": {}, "calib_batches": 1,
      "source": {"workdir": str(tmp_path), "step": 0}, "recipe_quant": recipe.to_dict(),
      "model": block})
  return out, recipe


def _ptq_logits(out, recipe, cfg, params=None):
  """qtrain's PTQ model, as qtrain.quantize evaluates it."""
  block = _model_block(cfg)
  model = Transformer(cfg, ptq_providers(str(out), ev.eval_provider(recipe, block)))
  params = load_quantized(str(out)) if params is None else params
  return np.asarray(jax.jit(model.apply)({"params": params}, TOKENS))


def _convert(capsys, *argv) -> str:
  main(["export", *argv])
  return capsys.readouterr().out


def _load(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation="eager").eval()


@pytest.mark.parametrize("cfg,recipe,bits,granularity", [
    (LLAMA, "w4a16+lm_head", None, None), (QWEN2, "w4a16", None, None), (LLAMA, "w4a16", 8, None),
    (LLAMA, "w4a16", 3, "tensor")],
    ids=["llama-w4-lm_head", "qwen2-tied-unscanned-w4", "llama-w8", "llama-w3-per-tensor"])
def test_rtn_weight_only_exports_as_packed_ints_with_the_ptq_logits(cfg, recipe, bits, granularity,
                                                                    tmp_path, capsys):
  """RTN W4A16 (W8A16; W3 per tensor: in nibbles, the scale repeated per
  channel) -> export --ptq -> transformers loads its packed-int Linears
  (quant_method "gemma", no extra package) -> the PTQ model's logits."""
  params = _random_params(cfg)
  out, rq = _export(tmp_path, cfg, params, recipe, bits=bits, granularity=granularity)
  shard = ["--max_shard_mb=0.01"] if bits == 8 else []  # ~10 KB shards: the index maps codes.
  said = _convert(capsys, f"--ptq={out}", f"--out={tmp_path / 'hf'}", *shard)
  assert "packed-int Linears" in said and "note:" not in said
  assert len(list((tmp_path / "hf").glob("*.safetensors"))) > (2 if shard else 0)
  doc = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert doc["quantization_config"]["quant_method"] == "gemma"
  model = _load(tmp_path / "hf")
  assert type(model).__name__ == ("Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM")
  q_proj = model.model.layers[1].self_attn.q_proj
  storage = 8 if bits == 8 else 4  # 3-bit codes take a nibble too.
  assert isinstance(q_proj, gemma_quant.QuantizedLinear) and q_proj.num_bits == storage
  assert q_proj.weight.dtype == (torch.int8 if storage == 8 else torch.uint8)
  assert isinstance(model.lm_head, gemma_quant.QuantizedLinear) == ("lm_head" in recipe)
  # transformers' own unpacking gives qtrain's dequantized kernels, bit for
  # bit, in every quantized Linear (7 per block, + the LM head if quantized).
  want_OI = params_to_hf_state_dict(load_quantized(str(out)), cfg)
  quantized = {n: m for n, m in model.named_modules()
               if isinstance(m, gemma_quant.QuantizedLinear)}
  assert len(quantized) == 7 * cfg.n_layers + ("lm_head" in recipe)
  with torch.no_grad():
    for name, module in quantized.items():
      got_OI = module._dequantize_weights().numpy()  # pylint: disable=protected-access
      np.testing.assert_array_equal(got_OI, want_OI[f"{name}.weight"], err_msg=name)
  got, want = hf_logits(model, TOKENS), _ptq_logits(out, rq, cfg)
  np.testing.assert_allclose(got, want, rtol=0, atol=LOGIT_ATOL)
  fp = np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, TOKENS))
  assert np.abs(fp - want).max() > QUANT_MOVES


def test_float_form_holds_the_grid_values(tmp_path, capsys):
  """--weights=float: a plain Llama whose kernels are the dequantized codes
  exactly (the float32 values qtrain's PTQ model multiplies); same logits."""
  params = _random_params(LLAMA)
  out, rq = _export(tmp_path, LLAMA, params, "w4a16")
  assert "dequantized float weights" in _convert(capsys, f"--ptq={out}",
                                                 f"--out={tmp_path / 'hf'}", "--weights=float")
  model = _load(tmp_path / "hf")
  assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
  kernel = load_quantized(str(out))["decoder"]["layers"]["mlp"]["down_proj"]["kernel"]
  np.testing.assert_array_equal(model.model.layers[0].mlp.down_proj.weight.detach().numpy(),
                                np.asarray(kernel[0]).T)
  np.testing.assert_allclose(hf_logits(model, TOKENS), _ptq_logits(out, rq, LLAMA), rtol=0,
                             atol=LOGIT_ATOL)


def test_what_the_int_form_cannot_hold_goes_float_with_the_ptq_logits(tmp_path, capsys):
  """Under --weights=auto each weight the packed-int form cannot hold is
  dequantized (a plain nn.Linear of the same checkpoint), with a note saying
  why; --weights=int refuses the export naming the reason. Group scales: all
  seven float. AWQ: its explicit 1/s (o_proj, down_proj) multiplied into those
  kernels, q/k/v/gate/up (1/s folded into the norms) int. QuaRot: R4 folded
  back into down_proj (float), R1/R2-fused weights int, R3 cancels. Each the
  same function as qtrain's PTQ model up to float32 rounding: the same bound."""
  params = _random_params(LLAMA)
  group, rq = _export(tmp_path, LLAMA, params, "w4a16+g8")
  with pytest.raises(SystemExit) as e:
    main(["export", f"--ptq={group}", f"--out={tmp_path / 'int'}", "--weights=int"])
  assert e.value.code == 2 and "scales per group" in capsys.readouterr().err
  said = _convert(capsys, f"--ptq={group}", f"--out={tmp_path / 'g'}")
  assert "dequantized float weights" in said and said.count("note: float, not int") == 7
  np.testing.assert_allclose(hf_logits(_load(tmp_path / "g"), TOKENS),
                             _ptq_logits(group, rq, LLAMA), rtol=0, atol=LOGIT_ATOL)

  awq, rq = _export(tmp_path, LLAMA, params, "w4a16", method="awq")
  said = _convert(capsys, f"--ptq={awq}", f"--out={tmp_path / 'a'}")
  assert "and 2 dequantized" in said
  assert "decoder/layers/mlp/down_proj: AWQ's explicit input scale" in said
  model, want = _load(tmp_path / "a"), _ptq_logits(awq, rq, LLAMA)
  layer = model.model.layers[1]
  assert isinstance(layer.self_attn.q_proj, gemma_quant.QuantizedLinear)
  assert type(layer.self_attn.o_proj) is torch.nn.Linear
  np.testing.assert_allclose(hf_logits(model, TOKENS), want, rtol=0, atol=LOGIT_ATOL)
  # Without the explicit 1/s the function differs: the fold is what matches.
  plain = jax.jit(Transformer(LLAMA).apply)({"params": load_quantized(str(awq))}, TOKENS)
  assert np.abs(want - np.asarray(plain)).max() > QUANT_MOVES

  rotated = rotated_config(LLAMA, "quarot")
  fused = jax.jit(lambda p: fuse_rotations(p, LLAMA, "quarot")[0])(params)  # Not op by op.
  quarot, rq = _export(tmp_path, rotated, fused, "w4a16")
  said = _convert(capsys, f"--ptq={quarot}", f"--out={tmp_path / 'r'}")
  assert "and 1 dequantized" in said and "down_proj: online R4" in said
  model = _load(tmp_path / "r")
  assert isinstance(model.model.layers[0].mlp.up_proj, gemma_quant.QuantizedLinear)
  assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
  np.testing.assert_allclose(hf_logits(model, TOKENS), _ptq_logits(quarot, rq, rotated), rtol=0,
                             atol=LOGIT_ATOL)


def test_activation_quantized_recipe_is_refused_unless_weights_only(tmp_path, capsys):
  """W4A4: transformers has no dynamic per-token activation quantizer, so the
  export is refused in one line naming --weights_only; with it, the HF model
  is the weight-only model of the same codes (qtrain's PTQ weights, float
  activations) and differs from the W4A4 PTQ model."""
  params = _random_params(LLAMA)
  out, rq = _export(tmp_path, LLAMA, params, "w4a4")
  with pytest.raises(SystemExit) as e:
    main(["export", f"--ptq={out}", f"--out={tmp_path / 'hf'}"])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and "\n" not in err
  assert "quantizes activations or KV" in err and "--weights_only" in err
  assert not (tmp_path / "hf" / "config.json").exists()
  said = _convert(capsys, f"--ptq={out}", f"--out={tmp_path / 'hf'}", "--weights_only")
  assert "note: --weights_only" in said
  got = hf_logits(_load(tmp_path / "hf"), TOKENS)
  weight_only = np.asarray(jax.jit(Transformer(LLAMA).apply)({"params": load_quantized(str(out))},
                                                             TOKENS))
  np.testing.assert_allclose(got, weight_only, rtol=0, atol=LOGIT_ATOL)
  assert np.abs(got - _ptq_logits(out, rq, LLAMA)).max() > QUANT_MOVES


def test_run_dir_finds_its_one_export_and_flags_are_checked(tmp_path, capsys):
  params = _random_params(LLAMA)
  out, _ = _export(tmp_path, LLAMA, params, "w4a16")
  assert f"of {out} as llama" in _convert(capsys, f"--ptq={tmp_path}", f"--out={tmp_path / 'hf'}")
  _export(tmp_path, LLAMA, params, "w4a16", bits=8)
  new = f"--out={tmp_path / 'new'}"
  for argv, says in [([f"--ptq={tmp_path}", new], "2 PTQ exports under it"),
                     ([f"--ptq={out}", "--step=2", new], "--step picks a checkpoint of --workdir"),
                     ([f"--workdir={tmp_path}", "--weights=int", new], "apply to --ptq exports"),
                     ([f"--ptq={out}", f"--out={tmp_path / 'hf'}"], "already holds a checkpoint")]:
    with pytest.raises(SystemExit):
      main(["export", *argv])
    assert says in capsys.readouterr().err
  assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_codes_is_what_transformers_unpacks(bits):
  """Every code of the width, an odd input dim (padded to a whole byte):
  transformers' own unpacking (gemma_quant._unpack_int*) gives them back."""
  lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
  codes = np.random.default_rng(bits).integers(lo, hi + 1, (5, 13)).astype(np.int8)
  stored = torch.from_numpy(pack_codes(codes, bits))
  # pylint: disable-next=protected-access
  unpack = {2: gemma_quant._unpack_int2, 4: gemma_quant._unpack_int4, 8: lambda s, _: s}[bits]
  np.testing.assert_array_equal(unpack(stored, 13).numpy(), codes)
  with pytest.raises(ValueError, match="outside"):
    pack_codes(np.full((1, 2), hi + 1, np.int16), bits)


def test_bfloat16_model_exports_its_bf16_grid(tmp_path, capsys):
  """param_dtype bfloat16: the PTQ model's kernels are bf16(code * scale).
  The float form stores exactly those; the int form's Linear computes
  bf16(code) * bf16(scale) in bf16, rounding the float32 scale first, so its
  weights are those values or one bf16 ulp (<= 2^-7 relative) away
  (measured: 8..9% of them). Logits are not compared: both sides compute in bf16 with their
  own accumulation (measured 0.12 apart at |logits| 3.6)."""
  cfg = dataclasses.replace(LLAMA, dtype="bfloat16", param_dtype="bfloat16")
  out, _ = _export(tmp_path, cfg, _random_params(cfg), "w4a16")
  want_OI = params_to_hf_state_dict(load_quantized(str(out)), cfg)
  _convert(capsys, f"--ptq={out}", f"--out={tmp_path / 'f'}", "--weights=float")
  _convert(capsys, f"--ptq={out}", f"--out={tmp_path / 'i'}")
  as_float, as_int = _load(tmp_path / "f"), _load(tmp_path / "i")
  assert as_float.dtype == as_int.dtype == torch.bfloat16
  name = "model.layers.1.mlp.gate_proj"
  want = np.asarray(want_OI[f"{name}.weight"], np.float32)
  got = as_float.get_submodule(name).weight.detach().float().numpy()
  np.testing.assert_array_equal(got, want)
  with torch.no_grad():
    got = as_int.get_submodule(name)._dequantize_weights(  # pylint: disable=protected-access
        torch.bfloat16).float().numpy()
  # One bf16 ulp of w in [2^e, 2^(e+1)) is 2^(e-7) <= 2^-7 |w|.
  assert np.all(np.abs(got - want) <= 2.0 ** -7 * np.abs(want))
  assert 0 < np.mean(got != want) < 0.25  # Rounding the scale first does move some.

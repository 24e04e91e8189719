"""Packed int4 weights for real (issue 16): the export stores symmetric 4-bit
codes two per byte, ``load_packed`` keeps them packed in the ``int4_packed``
weight form, and the packed model computes what the dequantized one does.

References: a NumPy transcription of the "halves" byte layout; the
dequantized float params of ``load_quantized`` (the format-2 path, tested
bit-identical to the in-memory PTQ weights in test_ptq); the dense model on
those params; greedy tokens of the dequantized export; float64 NumPy for the
kernel path.
"""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtrain.analysis import jaxprs
from qtrain.kernels import packed
from qtrain.layers import Linear, ModelConfig, Transformer, form_rules
from qtrain.quant import QuantProvider, QuantRule, QuantSpec
from qtrain.quantize import load_export, load_quantized, quantize_params, save_quantized
from qtrain.quantize import weight_sites
from qtrain.quantize.export import load_packed

W4 = QuantSpec(bits=4, granularity="channel")
W4_G8 = QuantSpec(bits=4, granularity="group", group_size=8)
W4_ASYM = QuantSpec(bits=4, granularity="channel", symmetric=False, calibration="minmax")
A4 = QuantSpec(bits=4, granularity="token", symmetric=False, calibration="minmax")
TINY = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8,
                   d_ff=32, max_seq_len=32)
RULES = (QuantRule(pattern=r"decoder/layers/attn/.*", weight=W4),
         QuantRule(pattern=r"decoder/layers/mlp/(gate|up)_proj", weight=W4_G8),
         QuantRule(pattern=r"decoder/layers/mlp/down_proj", weight=W4_ASYM),  # Stays int8.
         QuantRule(pattern="lm_head", weight=W4))


def _np_halves(q):
  """Byte i of column n: q[i] in the low nibble, q[i + K/2] in the high one."""
  q = np.asarray(q, np.int64)
  k = q.shape[-2]
  byte = (q[..., : k // 2, :] & 0xF) | ((q[..., k // 2:, :] & 0xF) << 4)
  return byte.astype(np.uint8).view(np.int8)


def test_pack_unpack_exact_against_numpy_layout():
  """Every code in [-8, 7], 2-D and scanned 3-D: the bytes are the NumPy
  halves layout, and unpacking gives the codes back, on device and host."""
  rng = np.random.default_rng(0)
  for shape in [(16, 5), (3, 32, 7)]:
    q = jnp.asarray(rng.integers(-8, 8, shape), jnp.int8)
    w = packed.pack(q, jnp.ones((*shape[:-2], 1, shape[-1])))
    assert w.codes.dtype == jnp.int8 and w.shape == shape
    np.testing.assert_array_equal(np.asarray(w.codes), _np_halves(q))
    np.testing.assert_array_equal(w.unpacked(), q)
    # The export's host-side twins (no device ops: exports may run under a mesh).
    np.testing.assert_array_equal(packed.pack_host(q), _np_halves(q))
    np.testing.assert_array_equal(packed.unpack_host(_np_halves(q)), q)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  """An RTN export of a random TINY model (packed), and its in-memory codes."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(jax.jit(Transformer(TINY).init)(jax.random.key(0), tokens)["params"])
  sites, _ = weight_sites(TINY, RULES)
  qw = quantize_params("rtn", params, sites)
  out = tmp_path_factory.mktemp("ptq")
  save_quantized(str(out / "packed"), params, qw, sites, {"recipe": "t", "method": "rtn"})
  save_quantized(str(out / "int8"), params, qw, sites, {"recipe": "t", "method": "rtn"},
                 pack_int4=False)
  return out, params, qw, sites


def test_export_stores_packed_codes_and_loads_bit_identically(export):
  out, _, qw, sites = export
  doc = json.loads((out / "packed" / "ptq.json").read_text())
  old = json.loads((out / "int8" / "ptq.json").read_text())
  assert doc["format"] == 3 and old["format"] == 2  # No packed weight: the old format.
  want = {"decoder/layers/attn/q_proj", "decoder/layers/attn/k_proj", "decoder/layers/attn/v_proj",
          "decoder/layers/attn/o_proj", "decoder/layers/mlp/gate_proj",
          "decoder/layers/mlp/up_proj", "lm_head"}
  assert {p for p, e in doc["weights"].items() if e.get("packing") == "int4_halves"} == want
  assert not any("packing" in e for e in old["weights"].values())
  # The stored codes are the halves layout of the in-memory int8 codes.
  _, disk, _ = load_export(str(out / "packed"))
  for s in sites:
    np.testing.assert_array_equal(disk[s.path].qt.q, qw[s.path].qt.q)
  # pack -> save -> load == the format-2 export's dequantized params, bit for bit.
  new, ref = load_quantized(str(out / "packed")), load_quantized(str(out / "int8"))
  flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref))
  flat_new = jax.tree_util.tree_leaves_with_path(new)
  assert len(flat_new) == len(flat_ref)
  for path, a in flat_new:
    b = flat_ref[path]
    assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(path)


def test_packed_params_are_an_eighth_of_float32_kernels(export):
  """codes = K N / 2 bytes = 1/8 of the float32 kernel (1/4 of bf16), plus one
  float32 scale per column (per group of 8 rows for gate/up); down_proj
  (asymmetric) is dequantized to float as before."""
  out, params, _, _ = export
  p, rules = load_packed(str(out / "packed"))
  layers, f = p["decoder"]["layers"], params["decoder"]["layers"]
  for mod, name, group in [("attn", "q_proj", 0), ("mlp", "up_proj", 8)]:
    node, kernel = layers[mod][name], f[mod][name]["kernel"]
    assert set(node) == {"codes", "scales"}
    assert node["codes"].nbytes * 8 == kernel.nbytes
    l, k, n = kernel.shape
    assert node["scales"].nbytes == l * (k // group if group else 1) * n * 4
  assert layers["mlp"]["down_proj"]["kernel"].dtype == jnp.float32
  assert {r.pattern for r in rules} == {"decoder/layers/attn/q_proj", "lm_head",
                                        "decoder/layers/mlp/up_proj", "decoder/layers/attn/o_proj",
                                        "decoder/layers/attn/k_proj", "decoder/layers/attn/v_proj",
                                        "decoder/layers/mlp/gate_proj"}
  # A format-2 export (codes one a byte) packs on load into the same params.
  p_old, rules_old = load_packed(str(out / "int8"))
  assert rules_old == rules
  for a, b in zip(jax.tree.leaves(p_old), jax.tree.leaves(p)):
    assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("act", [None, A4])
def test_packed_model_equals_dequantized_dense_model(export, act):
  """float32, XLA path: the packed form dequantizes exactly as load_quantized
  and issues the same dot, so logits are bit-equal (tolerance 0), weight-only
  and with W4A4's fake-quantized activations in front (an outer provider)."""
  out, _, _, _ = export
  p, rules = load_packed(str(out / "packed"))
  ref_params = load_quantized(str(out / "packed"))
  prov = None if act is None else QuantProvider(rules=(QuantRule(pattern=".*", act=act),))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, TINY.vocab_size)
  model = Transformer(dataclasses.replace(TINY, weight_forms=rules), prov)
  got = jax.jit(model.apply)({"params": p}, tokens)
  want = jax.jit(Transformer(TINY, prov).apply)({"params": ref_params}, tokens)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("m,k,group", [(15, 64, 0), (15, 64, 16), (40, 64, 32)])
def test_form_through_kernel_matches_float64(m, k, group):
  """bf16 activations take the W4A16 kernel (Pallas interpret mode): within
  2^-7 relative per element of float64 x @ W^ (one bf16 rounding of the
  output, 2^-8, plus float32 sums; x is bf16 on both sides, codes exact).
  Per channel (kernel groups of 32 repeating the column scale), per group of
  16 (two group pairs: split-K 2 of the decode blocks, M <= 16) and of 32 at
  M = 40 (the default blocks); the jaxpr shows the kernel ran."""
  rng = np.random.default_rng(m + group)
  n, n_scales = 24, k // group if group else 1
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16).reshape(m // 5 if m % 5 == 0 else 1,
                                                                     -1, k)
  q = jnp.asarray(rng.integers(-7, 8, (k, n)), jnp.int8)
  s = jnp.asarray(rng.uniform(0.01, 0.1, (n_scales, n)), jnp.float32)
  w = packed.pack(q, s)
  rules = form_rules([dict(pattern=".*", form="int4_packed", group_size=group,
                           kernels="interpret")])
  lin = Linear(n, ("embed", "mlp"), dtype=jnp.bfloat16, hooks=_forms(rules))
  apply = lambda x: lin.apply({"params": {"codes": w.codes, "scales": s}}, x)
  assert str(jax.make_jaxpr(apply)(x)).count("pallas_call") == 1
  y = np.asarray(apply(x), np.float64)
  ref = np.asarray(x, np.float64) @ (np.asarray(q, np.float64)
                                     * np.repeat(np.asarray(s, np.float64), k // n_scales, 0))
  np.testing.assert_array_less(np.abs(y - ref), 2.0 ** -7 * np.abs(ref) + 1e-6)


def _forms(rules):
  from qtrain.layers.hooks import Hooks  # pylint: disable=g-import-not-at-top
  return Hooks(forms=rules)


def test_form_rules_name_the_field():
  with pytest.raises(ValueError, match=r"weight_forms\[0\].group_size"):
    form_rules([dict(pattern="x", form="int4_packed", group_size=-1)])
  with pytest.raises(ValueError, match=r"weight_forms\[0\].kernels"):
    form_rules([dict(pattern="x", form="int4_packed", kernels="triton")])


def test_generate_from_packed_export_gives_the_dequantized_tokens(smoke_run_dir, tmp_path):
  """The smoke run, RTN w4a16 (per channel) exported packed: greedy tokens
  from the packed params equal those of the dequantized float export
  (float32 XLA path: the logits are bit-equal, see the test above)."""
  from qtrain.inference import load_ptq, load_run  # pylint: disable=g-import-not-at-top
  from qtrain.quant import validate_quant  # pylint: disable=g-import-not-at-top
  from qtrain.quantize import evaluate as ev  # pylint: disable=g-import-not-at-top
  from qtrain.train.sample import generate  # pylint: disable=g-import-not-at-top
  cfg, model, params, step = load_run(str(smoke_run_dir))
  recipe = ev.load_recipe("w4a16")
  sites, _ = weight_sites(model.cfg, validate_quant(recipe, cfg.model))
  qw = quantize_params("rtn", params, sites)
  save_quantized(str(tmp_path), params, qw, sites, {
      "recipe": "w4a16", "method": "rtn", "source": {"workdir": str(smoke_run_dir), "step": step},
      "recipe_quant": recipe.to_dict(), "model": cfg.model.to_dict()})
  _, m_packed, p_packed, _ = load_ptq(str(tmp_path))
  _, m_float, p_float, _ = load_ptq(str(tmp_path), packed=False)
  assert m_packed.cfg.weight_forms and not m_float.cfg.weight_forms
  assert p_packed["decoder"]["layers"]["attn"]["q_proj"]["codes"].dtype == jnp.int8
  prompt = [1, 17, 42, 5]
  want = generate(m_float, p_float, prompt, 6)
  assert generate(m_packed, p_packed, prompt, 6) == want and len(want) == 6


def test_decode_runs_kernels_inside_a_checkpointed_scan_body():
  """Decoding with a Pallas kernel in every block (W8A8's int8 kernel in
  interpret mode) inside the scanned stack: each block is a checkpoint
  around the kernel calls (on jax 0.11.2 / flax 0.12.10 nn.scan rejects a
  bare Pallas call in the body at decode: KERNEL_NOTES), and the greedy
  tokens equal the XLA path's (the int8 kernel is bit-equal to it)."""
  from qtrain.layers.kv_cache import init_cache  # pylint: disable=g-import-not-at-top
  from qtrain.train.sample import decode  # pylint: disable=g-import-not-at-top
  w8, a8 = QuantSpec(bits=8, granularity="channel"), QuantSpec(bits=8, granularity="token")
  # A 16-token prefill: the kernel takes dots whose dims are all >= 16.
  tokens = jax.random.randint(jax.random.key(2), (1, 16), 0, TINY.vocab_size)
  pos = jnp.arange(16, dtype=jnp.int32)[None]
  logits = {}
  for kernels in ("xla", "interpret"):
    prov = QuantProvider(rules=(QuantRule(pattern=r"decoder/.*", weight=w8, act=a8),),
                         mode="int8", kernels=kernels)
    model = Transformer(TINY, prov)
    params = model.init(jax.random.key(0), tokens)["params"]
    cache = init_cache(model, 1, 32)
    step = lambda p, c, m=model: decode(m, p, c, tokens, pos)
    if kernels == "interpret":  # scan -> checkpoint (remat2 / checkpoint) -> pallas_call.
      program = list(jaxprs.eqns(jax.make_jaxpr(step)(params, cache)))
      ckpt = [e for e, outer in program if e.primitive.name in ("remat2", "checkpoint", "remat")
              and outer and outer[-1].primitive.name == "scan"]
      assert len(ckpt) == 1
      assert sum(e.primitive.name == "pallas_call" and ckpt[0] in outer
                 for e, outer in program) > 0
    logits[kernels] = np.asarray(jax.jit(step)(params, cache)[0])
  np.testing.assert_array_equal(logits["interpret"], logits["xla"])

"""q/k/v and gate/up as one matmul each (``config.model.fused_qkv`` /
``fused_mlp``, ``qtrain.layers.linear.fused_dense``): the same params and
function as the separate Linears, one dot where every matmul is a plain dot,
the separate ones wherever a provider, a rotation or a weight form tells them
apart, and no extra collective on a mesh. References: the unfused model (one
device), its loss and gradients."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel_util import BATCH, SEQ, Run, batch, smoke_config
from qtrain.layers import HighPrecision, ModelConfig, Transformer, form_rules
from qtrain.layers.config import RotationConfig
from qtrain.quant import QuantProvider, QuantRule, QuantSpec
from test_quant_dot import count_dots  # pytest puts tests/ on sys.path

CFG = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
           init_std=0.2, attention_impl="xla", qkv_bias=True)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 64, size=(2, 8)), jnp.int32)
# Weight dots per block: q, k, v, o, gate, up, down; fused: qkv, o, gate_up, down.
SEPARATE, FUSED = 7, 4


def model(fused: bool, provider=None, **kw):
  return Transformer(ModelConfig(**{**CFG, **kw}, fused_qkv=fused, fused_mlp=fused), provider)


def loss_and_grads(m, params):
  f = lambda p: jnp.mean(m.apply({"params": p}, TOKENS) ** 2)
  return jax.jit(jax.value_and_grad(f))(params)


def weight_dots(m, params) -> int:
  """Weight dots per block of one forward: all dots less the head, per block
  traced (a scanned stack traces one), less attention's 2."""
  jaxpr = jax.make_jaxpr(lambda p: m.apply({"params": p}, TOKENS))(params).jaxpr
  blocks = 1 if m.cfg.scan_layers else m.cfg.n_layers
  return (sum(count_dots(jaxpr).values()) - 1) // blocks - 2


@pytest.mark.parametrize("scan", [True, False])
def test_fused_projections_are_the_separate_linears(scan):
  separate, fused = model(False, scan_layers=scan), model(True, scan_layers=scan)
  p_sep = nn.unbox(separate.init(jax.random.key(0), TOKENS)["params"])
  p_fused = nn.unbox(fused.init(jax.random.key(0), TOKENS)["params"])
  # One params tree, drawn alike: a checkpoint of either restores in the other.
  assert jax.tree.structure(p_sep) == jax.tree.structure(p_fused)
  for a, b in zip(jax.tree.leaves(p_sep), jax.tree.leaves(p_fused)):
    np.testing.assert_array_equal(a, b)
  assert weight_dots(separate, p_sep) == SEPARATE and weight_dots(fused, p_sep) == FUSED
  # Each output is the same D-term float32 dot product, which a wider GEMM may
  # block differently (D * u = 2e-6 relative); those roundings then pass
  # through softmax, the norms and the backward's token sums. Bound: 1e-5 of
  # each leaf's largest entry (measured <= 2.1e-6; a swapped k/v is O(1)).
  tol = 1e-5
  (l_sep, g_sep), (l_fused, g_fused) = loss_and_grads(separate, p_sep), loss_and_grads(fused, p_sep)
  assert abs(l_fused - l_sep) <= tol * abs(l_sep)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_sep)[0], jax.tree.leaves(g_fused)):
    assert np.abs(a - b).max() <= tol * np.abs(a).max(), jax.tree_util.keystr(path)


def test_anything_that_tells_the_matmuls_apart_keeps_them_separate():
  params = nn.unbox(model(False).init(jax.random.key(0), TOKENS)["params"])
  quant = QuantProvider(rules=(QuantRule(pattern=r"decoder/layers/.*", weight=QuantSpec(bits=4),
                                         act=QuantSpec(bits=4, granularity="token")),))
  # A quantizer sees each weight and its own scales: the fused model is the separate one.
  assert weight_dots(model(True, quant), params) == SEPARATE
  l_sep, _ = loss_and_grads(model(False, quant), params)
  l_fused, _ = loss_and_grads(model(True, quant), params)
  assert l_fused == l_sep
  # The pass-through provider leaves them plain dots: fused.
  assert weight_dots(model(True, HighPrecision()), params) == FUSED
  # A low-rank form on up_proj: gate/up stay apart, q/k/v fuse.
  low_rank = form_rules([dict(pattern=r"decoder/layers/mlp/up_proj", form="low_rank", rank=4)])
  lr_sep, lr_fused = model(False, weight_forms=low_rank), model(True, weight_forms=low_rank)
  p_lr = nn.unbox(lr_sep.init(jax.random.key(0), TOKENS)["params"])
  assert weight_dots(lr_sep, p_lr) == SEPARATE + 1  # up_proj is two products.
  assert weight_dots(lr_fused, p_lr) == SEPARATE + 1 - 2
  # Online R4 on down_proj (an activation rotation) does not touch q/k/v or gate/up.
  r4 = dict(rotation=RotationConfig(r4="hadamard"), d_ff=64)
  p_r4 = nn.unbox(model(False, **r4).init(jax.random.key(0), TOKENS)["params"])
  assert weight_dots(model(True, **r4), p_r4) == weight_dots(model(False, **r4), p_r4) - 3


def test_a_shared_per_tensor_fp8_quantizer_takes_the_joined_weight():
  """fp8 with one power-of-two scale per tensor (``fp8+tensor``): q/k/v and
  gate/up run as one quantized GEMM each, the joined weight, its input and
  its output gradient one tensor to the quantizer (TransformerEngine's fused
  QKV). A power-of-two scale only shifts a float8 value's exponent, so the
  parts' codes are those of their own scales unless a value falls below the
  format's smallest subnormal: the loss equals the separate quantized
  model's exactly and the gradients within the float32 reordering of the
  fused backward's dX (the sum over parts inside one GEMM; measured <= 7e-9,
  bound 1e-5 of each leaf's largest entry as above), while quantizing moves
  them by ~1e-2 of it. Per-channel fp8 scales differ per weight: apart."""
  params = nn.unbox(model(False).init(jax.random.key(0), TOKENS)["params"])
  e4 = QuantSpec(bits=8, format="fp8_e4m3", granularity="tensor", scale_pow2=True)
  quant = lambda spec: QuantProvider(rules=(QuantRule(pattern=r"decoder/layers/.*", weight=spec,
                                                      act=spec),), mode="fp8")
  assert weight_dots(model(True, quant(e4)), params) == FUSED
  assert weight_dots(model(False, quant(e4)), params) == SEPARATE
  channel = QuantSpec(bits=8, format="fp8_e4m3", granularity="channel")
  assert weight_dots(model(True, quant(channel)), params) == SEPARATE
  l_sep, g_sep = loss_and_grads(model(False, quant(e4)), params)
  l_fused, g_fused = loss_and_grads(model(True, quant(e4)), params)
  _, g_hp = loss_and_grads(model(False), params)
  assert l_fused == l_sep
  moved = 0.0
  for (path, a), b, c in zip(jax.tree_util.tree_flatten_with_path(g_sep)[0],
                             jax.tree.leaves(g_fused), jax.tree.leaves(g_hp)):
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), jax.tree_util.keystr(path)
    moved = max(moved, np.abs(a - c).max() / np.abs(a).max())
  assert moved > 1e-3  # The quantizer acts: the bound above is not vacuous.
  # The grouped q/k/v cotangent passes one optimization barrier per traced
  # block, so the quantizer's absmax and codes read one buffer
  # (linear._cotangent_materialized); gate/up's stacked parts and the forward none.
  m = model(True, quant(e4))
  f = lambda p: jnp.mean(m.apply({"params": p}, TOKENS) ** 2)
  barriers = lambda jaxpr: str(jaxpr).count("optimization_barrier")
  blocks = 1 if m.cfg.scan_layers else m.cfg.n_layers
  assert barriers(jax.make_jaxpr(f)(params)) == 0
  assert barriers(jax.make_jaxpr(jax.grad(f))(params)) == blocks


COLLECTIVES = re.compile(r"= [^=]*\b(all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(-start)?\(")


@pytest.mark.parametrize("layout", [
    # tensor=2 over 2 kv heads: q and kv heads split alike, q/k/v fuse.
    dict(data=2, fsdp=2, tensor=2),
    # tensor=4 over 2 kv heads: kv replicated while q splits; q/k/v stay apart
    # (joined they would be resharded every step), gate/up fuse.
    dict(data=2, tensor=4)])
def test_fused_on_a_mesh_equals_one_device_with_no_extra_collective(layout):
  def run(fused, **mesh):
    cfg = smoke_config(**mesh)
    cfg.model.update(fused_qkv=fused, fused_mlp=fused)
    return Run(cfg)
  state = run(False).init_state()
  ref_loss, ref_grads, _ = run(False).loss_and_grads(state.params, batch())
  _, _, hlo_sep = run(False, **layout).loss_and_grads(state.params, batch())
  loss, grads, hlo = run(True, **layout).loss_and_grads(state.params, batch())
  # Float32 reordering of the B*T-token sums (tests/test_parallel.py's bound).
  reorder = BATCH * SEQ * 2.0 ** -24
  assert abs(loss - ref_loss) <= reorder * abs(ref_loss)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                          jax.tree.leaves(ref_grads)):
    assert np.abs(g - w).max() <= reorder * np.abs(w).max(), jax.tree_util.keystr(path)
  count = lambda text: len(COLLECTIVES.findall(text))
  assert count(hlo) <= count(hlo_sep), (count(hlo), count(hlo_sep))


def test_fused_under_a_pipeline_equals_one_device():
  """1F1B over pipeline=2 x tensor=2 x data=2 (the llama configs, fused, as
  benchmarks/scaling.py runs them): the stages' rules are the mesh's less the
  manual axes, and q/k/v still fuse kv head by kv head."""
  from test_pipeline import compile_gradients, pipeline_config  # pylint: disable=g-import-not-at-top
  single = Run(pipeline_config())
  state = single.init_state()
  ref_loss, ref_grads, _ = single.loss_and_grads(state.params, batch())
  cfg = pipeline_config("1f1b", 2, pipeline=2, tensor=2, data=2)
  cfg.model.update(fused_qkv=True, fused_mlp=True)
  compiled, args, run = compile_gradients(cfg, state.params, batch())
  with run.layout:
    loss, grads = compiled(*args)
  reorder = BATCH * SEQ * 2.0 ** -24  # As above (measured: 7.7e-7 of the largest entry).
  assert abs(float(loss) - ref_loss) <= reorder * abs(ref_loss)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert np.abs(np.asarray(g) - w).max() <= reorder * np.abs(w).max()

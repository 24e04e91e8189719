"""Muon (qtrain/optim/muon.py) against a float64 NumPy Muon and optax's own,
the OSP partition over a quantized model, stacked Muon on 8 devices equal to
one device (and its collectives), and the configs/osp files."""

from __future__ import annotations

import collections
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from parallel_util import parse_hlo, smoke_config
from qtrain.config import ConfigError, base_config, validate
from qtrain.config.variants import config_module
from qtrain.optim import (assign_groups, build_muon, build_optimizer, decay_mask,
                          opt_state_shardings, osp_groups, param_path, parse_groups)
from qtrain.optim.muon import _as_stack, matrix_of, newton_schulz, newton_schulz_flops
from qtrain.parallel import Layout
from qtrain.parallel.rules import logical_sharding
from qtrain.train.build import build_model
from qtrain.train.state import abstract_params

NS = (3.4445, -4.7750, 2.0315)  # Jordan's quintic coefficients.
BETA, LR, WD = 0.95, 0.05, 0.1


def boxed(shape, names):
  return nn.Partitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)


# A wide 2-D matrix, a tall one (Newton-Schulz runs on its transpose) and a
# scanned [L, in, out] stack whose layer axis is a batch axis.
TREE = {"a": {"kernel": boxed((16, 24), ("embed", "mlp"))},
        "b": {"kernel": boxed((24, 8), ("mlp", "embed"))},
        "decoder": {"layers": {"c": {"kernel": boxed((3, 8, 12), ("layers", "embed", "mlp"))}}}}
NO_DECAY = (r"b/kernel",)


def muon_tx(tree, stacked: bool, lr=LR, wd=WD, **fields):
  c = base_config().optim.muon
  c.update(stacked=stacked, **fields)
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  return build_muon(c, learning_rate=lr, weight_decay=wd,
                    decay_mask=lambda p: decay_mask(p, NO_DECAY),
                    params={param_path(p): leaf for p, leaf in flat})


def unboxed(tree):
  """The ShapeDtypeStructs of a tree of boxed (and plain) abstract params."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def random_like(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda b: rng.normal(size=b.value.shape).astype(np.float32), tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def run_steps(tx, params, grads):
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))
  state = tx.init(params)
  for g in grads:
    params, state = step(params, state, g)
  return jax.tree.map(np.asarray, params)


# ------------------------------------------------ float64 NumPy reference --


def np_newton_schulz(g, steps=5, eps=1e-8):
  tall = g.shape[0] > g.shape[1]
  x = g.T if tall else g
  x = x / (np.linalg.norm(x) + eps)
  a, b, c = NS
  for _ in range(steps):
    s = x @ x.T
    x = a * x + (b * s + c * s @ s) @ x
  return x.T if tall else x


def np_muon(params: dict, grads: list[dict], decays: dict) -> dict:
  """Muon on 2-D float64 matrices ({name: [A, B]}): optax's bias-corrected
  EMA momentum with Nesterov, m_t = b m + (1-b) g,
  u = b m_t / (1 - b^(t+1)) + (1-b) g / (1 - b^t) (at t = 1 this is
  proportional to Moonlight's mu M + G with M = G, and Newton-Schulz divides
  the scale out), then W -= lr (0.2 sqrt(max(A, B)) NS(u) + wd W)
  (Liu et al. 2025, eq. 4: RMS 0.2 like AdamW; decay decoupled)."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in p.items()}
  for t, g in enumerate(grads, start=1):
    for k in p:
      gk = g[k].astype(np.float64)
      mu[k] = BETA * mu[k] + (1 - BETA) * gk
      u = BETA * mu[k] / (1 - BETA ** (t + 1)) + (1 - BETA) * gk / (1 - BETA ** t)
      o = 0.2 * np.sqrt(max(u.shape)) * np_newton_schulz(u)
      p[k] = p[k] - LR * (o + (WD if decays[k] else 0.0) * p[k])
  return p


def as_matrices(tree) -> dict:
  """{name: 2-D} of TREE-shaped arrays, the scanned stack split per layer."""
  out = {"a": tree["a"]["kernel"], "b": tree["b"]["kernel"]}
  for i, m in enumerate(tree["decoder"]["layers"]["c"]["kernel"]):
    out[f"c{i}"] = m
  return out


@pytest.mark.parametrize("stacked", [False, True])
def test_three_steps_match_float64_numpy(stacked):
  params, grads = random_like(TREE, 0), [random_like(TREE, s) for s in (1, 2, 3)]
  got = as_matrices(run_steps(muon_tx(TREE, stacked), params, grads))
  decays = {k: k != "b" for k in got}
  want = np_muon(as_matrices(params), [as_matrices(g) for g in grads], decays)
  for k in want:
    # float32 Newton-Schulz: five quintic steps amplify the input rounding
    # (slope 3.4 at 0) to ~1e-5 of an update entry (~0.2 lr); the params move
    # by 3 updates of ~1e-2 each, so 2e-6 absolute is ~1e-4 of a step.
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=2e-6, err_msg=k)
  # And the steps were real: every param moved by about 3 x lr x 0.2 RMS.
  moved = {k: np.sqrt(np.mean((want[k] - as_matrices(params)[k]) ** 2)) for k in want}
  assert all(0.01 < v < 0.05 for v in moved.values()), moved


def _dot_flops(jaxpr) -> int:
  """2 x output elements x contraction size, summed over every dot_general of
  a jaxpr and the jaxprs nested in it (jnp.matmul traces through pjit)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
    for v in eqn.params.values():
      inner = getattr(v, "jaxpr", v)
      if hasattr(inner, "eqns"):
        total += _dot_flops(inner)
  return total


@pytest.mark.parametrize("shape", [(3, 8, 12), (2, 24, 6)])
def test_newton_schulz_flops_count_the_dots_it_runs(shape):
  """The analytic count the benchmarks print equals the dots of the traced
  iteration, for a wide stack and a tall one (iterated on its transpose)."""
  m = matrix_of("decoder/layers/c/kernel", boxed(shape, ("layers", "embed", "mlp")))
  x_BMN, _ = _as_stack(jnp.ones(shape, jnp.float32), m)
  traced = jax.make_jaxpr(lambda x: newton_schulz(x, 5, 1e-7))(x_BMN).jaxpr
  assert newton_schulz_flops(m, 5) == _dot_flops(traced) > 0


def test_layer_axis_is_a_batch_axis():
  """The scanned stack updates exactly like per-layer Muon on unstacked 2-D
  kernels (optax.contrib.muon's default, 2-D rule)."""
  stack = {"decoder": {"layers": {"c": {"kernel": boxed((3, 8, 12), ("layers", "embed", "mlp"))}}}}
  params, grads = random_like(stack, 0), [random_like(stack, s) for s in (1, 2)]
  per_layer = optax.contrib.muon(LR, consistent_rms=0.2, weight_decay=WD)
  split = lambda t: {str(i): m for i, m in enumerate(t["decoder"]["layers"]["c"]["kernel"])}
  want = run_steps(per_layer, split(params), [split(g) for g in grads])
  for stacked in (False, True):
    got = split(run_steps(muon_tx(stack, stacked), params, grads))
    for k in want:  # Same float32 math, batched: a few ulps of the params.
      np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=f"{stacked} {k}")


@pytest.mark.parametrize("path, leaf", [
    ("decoder/layers/attn_norm/scale", boxed((2, 64), ("layers", "norm"))),
    ("final_norm/scale", boxed((64,), ("norm",))),
    ("decoder/layers/mlp/down_proj/dot_general/weight_step", jax.ShapeDtypeStruct((2, 1, 64),
                                                                                  jnp.float32)),
])
def test_a_param_that_is_not_a_matrix_fails_naming_it(path, leaf):
  with pytest.raises(ConfigError, match=rf"param '{re.escape(path)}' .*send it to adamw"):
    build_muon(base_config().optim.muon, learning_rate=LR, weight_decay=WD,
               decay_mask=None, params={path: leaf})


# ------------------------------------------------------------- partition --


def lsq_low_rank_config(**osp):
  """configs/default.py:smoke,w4a4 with learned (LSQ) steps and a low-rank
  up_proj: every kind of param the partition must place."""
  cfg = default.get_config("smoke,w4a4")
  cfg.model.vocab_size = 512
  r = cfg.quant.rules.linears
  r.weight.update(calibration="lsq", estimator="lsq")
  r.act.update(calibration="lsq_plus", estimator="lsq", granularity="tensor")
  cfg.model.weight_forms = (dict(pattern=r"decoder/layers/mlp/up_proj", form="low_rank",
                                 rank=8),)
  cfg.optim.groups = osp_groups(**osp)
  validate(cfg, n_devices=1)
  return cfg


def _placement(cfg):
  boxed_params = abstract_params(build_model(cfg), 16)
  paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]]
  groups = parse_groups(cfg.optim)
  index, _ = assign_groups(groups, paths)
  return {p: groups[i].optimizer for p, i in index.items()}, boxed_params


def test_osp_groups_place_every_param_of_a_quantized_lsq_model():
  placed, boxed_params = _placement(lsq_low_rank_config())
  muon = {p for p, o in placed.items() if o == "muon"}
  assert muon == {f"decoder/layers/attn/{n}_proj/kernel" for n in "qkvo"} | {
      "decoder/layers/mlp/gate_proj/kernel", "decoder/layers/mlp/down_proj/kernel",
      "decoder/layers/mlp/up_proj/a", "decoder/layers/mlp/up_proj/b"}
  adamw = set(placed) - muon
  assert {"embedding", "lm_head/kernel", "final_norm/scale"} <= adamw
  assert sum(p.endswith(("_step", "_offset")) for p in adamw) == 3 * 8  # 8 matmuls x 3.
  # No unmatched param, no non-matrix in Muon, and an update traces through the
  # partition (Muon's leaves among AdamW's masked ones).
  tx = build_optimizer(lsq_low_rank_config(), boxed_params)
  values = unboxed(boxed_params)
  updates, _ = jax.eval_shape(tx.update, values, jax.eval_shape(tx.init, values), values)
  assert jax.tree.map(lambda u: u.shape, updates) == jax.tree.map(lambda v: v.shape, values)
  # The switches: the head to Muon; the embeddings too (the paper's Muon-dagger).
  placed, _ = _placement(lsq_low_rank_config(head="muon", embedding="muon"))
  assert placed["lm_head/kernel"] == placed["embedding"] == "muon"
  with pytest.raises(ValueError, match=r"osp_groups\(head='sgd'\)"):
    osp_groups(head="sgd")


# ------------------------------------------------------- sharded stacking --

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute")


def _sharded_update(cfg, n, params, grads):
  """(updates as numpy, {collective: count}) of one jitted update on the
  mesh of ``cfg.mesh``, params and state sharded by their logical axes."""
  model = build_model(cfg)
  layout = Layout.from_config(cfg, jax.devices()[:n])
  with layout:
    box = abstract_params(model, 32)
    tx = build_optimizer(cfg, box)
    values = unboxed(box)
    p_sh = logical_sharding(box, layout.mesh)
    s_sh = opt_state_shardings(jax.eval_shape(tx.init, values), values, p_sh, layout.mesh)
    p, g = jax.device_put(params, p_sh), jax.device_put(grads, p_sh)
    state = jax.jit(tx.init, out_shardings=s_sh)(p)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p)[0], in_shardings=(p_sh, s_sh, p_sh),
                   out_shardings=p_sh)
    compiled = step.lower(p, state, g).compile()
    updates = compiled(p, state, g)
  counts = collections.Counter(
      i.op for instrs in parse_hlo(compiled.as_text()).values() for i in instrs
      if i.op.removesuffix("-start") in COLLECTIVES)
  return jax.tree.map(np.asarray, updates), counts


def osp_smoke(stacked: bool, **mesh):
  cfg = smoke_config(**mesh)
  cfg.optim.groups = osp_groups(head="muon")
  cfg.optim.muon.stacked = stacked
  return cfg


@pytest.fixture(scope="module")
def one_device():
  """(params, grads, updates of optax.contrib.muon on one device) of the smoke model."""
  model = build_model(osp_smoke(False))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))["params"])
  params = jax.tree.map(np.asarray, params)
  grads = jax.tree.map(lambda p: np.random.default_rng(1).normal(size=p.shape).astype(p.dtype),
                       params)
  return params, grads, _sharded_update(osp_smoke(False), 1, params, grads)[0]


@pytest.mark.parametrize("mesh", [dict(fsdp=8), dict(fsdp=4, tensor=2)])
def test_stacked_muon_on_a_mesh_equals_one_device_and_moves_whole_matrices(mesh, one_device):
  """Stacks of 4 (64x64: q, o), 4 (32x64: k, v transposed) and 6 (64x160:
  gate, up, down transposed) matrices, none a multiple of 8: padded with zero
  matrices to 8 and split one matrix per device."""
  params, grads, want = one_device
  got, stacked = _sharded_update(osp_smoke(True, **mesh), 8, params, grads)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    # Same float32 math on one device per matrix; only XLA's fusion differs.
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=param_path(path))
  # Stacked: the momentum moves by all-to-all (there and back), Newton-Schulz
  # runs on whole local matrices: no all-gather of a stack or a param, and
  # all-reduces only of scalars (the update's bookkeeping, not the matmuls).
  assert stacked["all-gather"] == 0 and stacked["reduce-scatter"] == 0, stacked
  assert stacked["all-to-all"] > 0, stacked
  if "tensor" in mesh:
    return
  # optax.contrib.muon per leaf on the same sharded params: the partitioner
  # gathers and all-reduces inside every Newton-Schulz iteration (measured:
  # 75 all-gathers, 17 all-reduces at fsdp=8; 105 and 58 at fsdp=4 x tensor=2).
  _, per_leaf = _sharded_update(osp_smoke(False, **mesh), 8, params, grads)
  assert per_leaf["all-gather"] >= 5 * 7 and per_leaf["all-reduce"] >= 5, per_leaf


# ------------------------------------------------------------ validation --


@pytest.mark.parametrize("field, value, message", [
    ("ns_steps", 0, "config.optim.muon.ns_steps=0"),
    ("rms_scale", 0.0, "config.optim.muon.rms_scale=0.0"),
    ("beta", 1.0, "config.optim.muon.beta=1.0"),
    ("ns_dtype", "float16", "config.optim.muon.ns_dtype='float16'"),
    ("stack_axes", ("fsdp", "expert"), r"config.optim.muon.stack_axes=('fsdp', 'expert')"),
])
def test_bad_muon_fields_name_the_field(field, value, message):
  cfg = default.get_config()
  cfg.optim.groups = osp_groups()
  cfg.optim.muon[field] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(cfg, n_devices=1)
  cfg = default.get_config()
  cfg.optim.groups = osp_groups()
  cfg.optim.muon.update(stacked=False, ns_dtype="bfloat16")
  with pytest.raises(ConfigError, match=r"ns_dtype='bfloat16' needs config.optim.muon.stacked"):
    validate(cfg, n_devices=1)


# ----------------------------------------------------------- configs/osp --

OSP = {"adam": dict(norm="rmsnorm", embproj=False, muon=False),
       "muon": dict(norm="rmsnorm", embproj=False, muon=True),
       "muon_ssnorm": dict(norm="ssnorm", embproj=False, muon=True),
       "muon_embproj": dict(norm="rmsnorm", embproj=True, muon=True),
       "osp": dict(norm="ssnorm", embproj=True, muon=True)}


@pytest.mark.parametrize("name", sorted(OSP))
def test_osp_configs_validate_and_cover_every_param(name):
  want = OSP[name]
  cfg = config_module(f"osp.{name}").get_config("smoke")
  validate(cfg, n_devices=1)
  assert (cfg.model.norm, cfg.model.embproj) == (want["norm"], want["embproj"])
  placed, boxed_params = _placement(cfg)
  build_optimizer(cfg, boxed_params)  # Every param in a group, Muon's all matrices.
  used = set(placed.values())
  assert used == ({"adamw", "muon"} if want["muon"] else {"adamw"}), used
  if want["muon"]:
    assert placed["embedding"] == placed["lm_head/kernel"] == "adamw"
    assert placed["decoder/layers/mlp/down_proj/kernel"] == "muon"
  if want["embproj"]:
    assert placed["embed_proj/kernel"] == placed["head_proj/kernel"] == "muon"
  # The sizes: make-train scale by default, llama_125m:corpus for :125m.
  full, big = (config_module(f"osp.{name}").get_config(v) for v in ("", "125m"))
  assert (full.model.d_model, full.data.dir) == (192, "data/kjv")
  assert (big.model.d_model, big.data.dir, big.data.seq_len) == (768, "data/debian_en", 1024)
  assert (big.model.norm, big.model.embproj) == (want["norm"], want["embproj"])

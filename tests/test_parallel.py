"""Every layout computes the same function, on 8 fake CPU devices.

* The smoke model's loss and gradients on dp, fsdp, tp+sp (kv heads fewer
  than tensor), fsdp x tp x dp and sequence x fsdp equal the single-device
  result within float32 reordering; ``w4a4kv4`` fake-quant and ``w8a8`` int8
  up to rounding flips (a quarter of the quantization noise, see FLIPS); one
  AdamW train step moves the params the same way.
* The quantized matmul with its contraction (or output) dim split over a mesh
  axis equals the single-device call: bit for bit on int8 codes.
* The compiled program: FSDP gathers one layer's weights at a time inside the
  scan and reduces each layer's gradients there; the vocab-parallel LM head
  and loss never gather the full logits; no device handles activations of
  other data shards (xfail under tensor parallelism: the embedding lookup).

The state is initialised once on one device and placed on every mesh, and
each (layout, quantization) pair compiles once per module (``Runs``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from parallel_util import (BATCH, SEQ, VOCAB, Run, batch, instructions, parse_hlo, same_dims,
                           smoke_config, while_loops)
from qtrain.quant import QuantDotGeneral, QuantSpec, dequantize, quantize

U = 2.0 ** -24  # float32 unit roundoff.
LAYOUTS = {
    "dp": dict(data=8),
    "fsdp": dict(fsdp=8),
    # 4 query heads / 2 kv heads over tensor=4: the k/v projections are
    # replicated over tensor (rules' kv_heads -> None) while q is split.
    "tp_sp": dict(data=2, tensor=4),
    "fsdp_tp_dp": dict(data=2, fsdp=2, tensor=2),
}
TENSOR = ("tp_sp", "fsdp_tp_dp")
# The sequence axis has no kernel of its own yet (the next issue gives it
# context-parallel attention; XLA gathers keys and values): unquantized only.
SEQUENCE = {"sequence_fsdp": dict(sequence=2, fsdp=4)}

# Float32 tolerance of a layout against one device. A layout splits sums the
# single device does in one go: the loss over the B*T = 256 tokens, each
# weight gradient over the tokens (and the row-parallel / vocab-parallel
# contractions over tensor shards), then adds the partial sums in another
# order. Reordering a float32 sum of n terms moves it by at most ~n*u times
# the sum of their magnitudes: n*u = 256 * 6e-8 = 1.5e-5 of the largest
# element. Measured: loss <= 4e-7 relative, gradients <= 1.0e-6 of the
# leaf's largest element.
REORDER = BATCH * SEQ * U


class Runs:
  """Loss, gradients, HLO and a train step per (quant, layout), each once."""

  def __init__(self):
    self.state = Run(smoke_config()).init_state()
    self.batch = batch()

  @functools.cache
  def grads(self, quant: str, layout: str | None = None):
    """(loss, grads, hlo text); ``layout`` None: one device."""
    run = Run(smoke_config(quant, **{**LAYOUTS, **SEQUENCE}.get(layout, {})))
    return run.loss_and_grads(self.state.params, self.batch)

  @functools.cache
  def step(self, layout: str | None = None):
    run = Run(smoke_config("", **LAYOUTS.get(layout, {})))
    return run.train_step(self.state, self.batch)


@pytest.fixture(scope="module")
def runs():
  return Runs()


def named_leaves(tree):
  return [(jax.tree_util.keystr(p), np.asarray(x))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_reordered(got, want, what=""):
  """Each leaf within REORDER of its largest element (see REORDER)."""
  for (path, g), (_, w) in zip(named_leaves(got), named_leaves(want)):
    err, tol = np.abs(g - w).max(), REORDER * np.abs(w).max()
    assert err <= tol, f"{what}{path}: max |diff| {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("layout", [*LAYOUTS, *SEQUENCE])
def test_loss_and_grads_equal_single_device(runs, layout):
  loss, grads, _ = runs.grads("", layout)
  ref_loss, ref_grads, _ = runs.grads("")
  assert abs(loss - ref_loss) <= REORDER * abs(ref_loss), (loss, ref_loss)
  assert_reordered(grads, ref_grads, f"{layout}: ")


# Quantized layouts: a quantizer rounds to the nearest code, and its input
# differs from one device's by float32 reordering (1e-7 relative: split
# partial sums of row-parallel and vocab-parallel dots, other fusions of the
# norms per shard shape), so an element that close to a rounding boundary
# lands on the neighbouring code. A flip swaps one rounding error (<= s/2) for
# another (<= s/2) on the other side: a handful of them move the gradient by a
# small part of what all the roundings together move it, the quantization
# noise ||g_q - g_fp32|| of the same params and batch on one device. A layout
# that quantized differently (per-shard scales, a missing reduction) redraws
# every rounding and lands at about that noise or beyond (the check below:
# 0.4 to 0.9 of it). The bound, a quarter of the noise per leaf (and for the
# loss), sits between. Measured: w8a8 0.06 under tensor parallelism (its int8
# backward rounds dY per token / per column right after the vocab-parallel
# LM head's split dX sum; with float backward dots, hp_bwd, it is float32-
# exact), 1e-4 on dp and fsdp; w4a4kv4 float32-exact on every layout here;
# fp8+tensor <= 5.5e-5 (its per-tensor absmax is one max over all shards,
# an all-reduce under a mesh: the same scale as one device's).
FLIPS = 0.25


def flip_ratios(quant, grads, runs):
  """{leaf: ||grads - g_q|| / ||g_q - g_fp32||}, g on one device."""
  _, ref, _ = runs.grads(quant)
  _, fp32, _ = runs.grads("")
  out = {}
  for (path, g), (_, r), (_, f) in zip(named_leaves(grads), named_leaves(ref), named_leaves(fp32)):
    noise = np.linalg.norm(r - f)
    assert noise > 0, f"{quant} does not reach {path}"
    out[path] = float(np.linalg.norm(g - r) / noise)
  return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("quant", ["w4a4kv4", "w8a8", "fp8+tensor"])
def test_quantized_loss_and_grads_equal_single_device_up_to_rounding_flips(runs, layout, quant):
  loss, grads, _ = runs.grads(quant, layout)
  ref_loss = runs.grads(quant)[0]
  noise = abs(ref_loss - runs.grads("")[0])
  assert abs(loss - ref_loss) <= REORDER * abs(ref_loss) + FLIPS * noise, (loss, ref_loss)
  ratios = flip_ratios(quant, grads, runs)
  assert max(ratios.values()) <= FLIPS, ratios


def test_rounding_flip_bound_rejects_a_layout_that_quantizes_per_shard(runs):
  """Not vacuous: activation scales per 16 features instead of per token (what
  a row-parallel matmul computing its scales per shard would do) on tp_sp is
  another quantization of the same model; every leaf lands above the bound."""
  cfg = smoke_config("w4a4kv4", **LAYOUTS["tp_sp"])
  cfg.quant.rules.linears.act.update(granularity="group", group_size=16)
  _, grads, _ = Run(cfg).loss_and_grads(runs.state.params, runs.batch)
  ratios = flip_ratios("w4a4kv4", grads, runs)
  assert min(ratios.values()) > FLIPS, ratios


@pytest.mark.parametrize("layout", LAYOUTS)
def test_adamw_step_equals_single_device(runs, layout):
  """One step of make_steps' train step (AdamW, clip 1.0, lr 3e-3, no warmup).
  Adam's first update is u = g / (|g| + eps) (bias-corrected m = g, v = g^2),
  whose slope eps / (|g| + eps)^2 turns a gradient error d into an update error
  up to d * eps / (max(|g| - d, 0) + eps)^2 (<= 2): elements with |g| near eps
  may move differently. On top, float32 rounding: u passes through 8 roundings
  (m, v, their bias corrections, sqrt, + eps, the division, times lr), each
  <= u32 relative, on either side (lr * 16 u32), and p - lr * u rounds (2 ulps
  of p). Measured: up to 4 lr u32 at |g| ~ 1e-4, 5e-8 at |g| = 2e-7."""
  params, metrics = runs.step(layout)
  ref_params, ref_metrics = runs.step()
  assert metrics["finite"] == 1 and ref_metrics["grad_norm"] < 1.0  # No clipping at step 1.
  for key in ("loss", "grad_norm"):
    assert abs(metrics[key] - ref_metrics[key]) <= REORDER * abs(ref_metrics[key]), key
  _, grads, _ = runs.grads("")
  lr, eps = ref_metrics["lr"], 1e-8
  assert lr == pytest.approx(3e-3)
  for (path, p), (_, want), (_, g), (_, p0) in zip(
      named_leaves(params), named_leaves(ref_params), named_leaves(grads),
      named_leaves(runs.state.params)):
    d = REORDER * np.abs(g).max()
    du = np.minimum(2.0, d * eps / (np.maximum(np.abs(g) - d, 0) + eps) ** 2)
    tol = lr * (du + 16 * U) + 2 * U * np.abs(want)
    assert np.all(np.abs(p - want) <= tol), (path, np.abs(p - want).max())
    assert np.abs(want - p0).max() > 0.5 * lr, path  # The step moved every leaf.


# ------------------------------------------------ the quantized matmul alone --

W8, A8 = QuantSpec(bits=8, granularity="channel"), QuantSpec(bits=8, granularity="token")
W4 = QuantSpec(bits=4, granularity="channel")
A4 = QuantSpec(bits=4, granularity="token", symmetric=False, calibration="minmax")
DN = (((1,), (0,)), ((), ()))  # x [M, K] . w [K, N]
M, K, N = 16, 64, 24


def operands(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_t(5, size=(M, K)).astype(np.float32)
  w = (rng.normal(size=(K, N)) * rng.uniform(0.2, 2.0, N)).astype(np.float32)
  c = rng.normal(size=(M, N)).astype(np.float32)
  return x, w, c


def value_and_grads(dot, x, w, c):
  """y and the grads of sum(c * y) with respect to x and w."""
  f = lambda x, w: jnp.sum(c * dot.apply({}, x, w, DN))
  return dot.apply({}, x, w, DN), jax.grad(f, argnums=(0, 1))(x, w)


def sharded(dot, x, w, c, x_spec, w_spec):
  """value_and_grads with x, w, c split over a (data=2, tensor=4) mesh; the
  results and the compiled program."""
  mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2,
                       devices=jax.devices()[:8])
  sh = lambda spec: NamedSharding(mesh, spec)
  f = jax.jit(functools.partial(value_and_grads, dot),
              in_shardings=(sh(x_spec), sh(w_spec), sh(P(x_spec[0], w_spec[1]))))
  compiled = f.lower(x, w, c).compile()
  return jax.tree.map(np.asarray, compiled(x, w, c)), parse_hlo(compiled.as_text())


def one_device(dot, x, w, c):
  f = jax.jit(functools.partial(value_and_grads, dot))
  return jax.tree.map(np.asarray, f(*jax.device_put((x, w, c), jax.devices()[0])))


def reduced(module, dtype: str) -> list:
  """All-reduces in the program returning ``dtype`` arrays (split sums)."""
  return [i for i in instructions(module, "all-reduce") if any(d == dtype for d, _ in i.shapes)]


@pytest.mark.parametrize("x_spec, w_spec", [
    (P("data", "tensor"), P("tensor", None)),  # K split (row-parallel), rows over data.
    (P("data", None), P(None, "tensor")),  # N split (column-parallel).
])
def test_int8_matmul_with_split_dims_is_bit_identical(x_spec, w_spec):
  """int8 per-channel weights x int8 per-token activations. With K split, the
  per-token scale is a max over the shards (exact) and the int32 partial sums
  add exactly; per-channel scales of a column-parallel weight are local. The
  int8 backward's dY scales (per row of dY s_w, per column of s_x dY) are maxes
  and its int32 dots split over M (dW) or nothing (dX). Nothing rounds
  differently: the bits equal one device's."""
  x, w, c = operands()
  dot = QuantDotGeneral(weight=W8, act=A8, mode="int8")
  got, module = sharded(dot, x, w, c, x_spec, w_spec)
  want = one_device(dot, x, w, c)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  # The program really split the int32 sums (K over tensor for y, M over data for dW).
  assert reduced(module, "s32"), "no int32 partial sums were reduced across devices"
  if w_spec[0] is None:  # Column-parallel: w stays split, never gathered whole.
    assert not [i for i in instructions(module, "all-gather")
                if any(same_dims(s, (K, N)) for _, s in i.shapes)]


def test_fake_quant_w4a4_matmul_with_split_contraction_within_float32():
  """Fake-quant int4 (per-channel weights, asymmetric per-token activations):
  the codes and scales are computed as on one device (a max / min over the K
  shards), but the partial sums of x^ w^ are float32 and added in another
  order: |diff| <= 2 K u sum_k |x^_k w^_k| (two float32 dot orders, each
  within K u of the exact sum); dW's sum over M is split likewise."""
  x, w, c = operands(seed=1)
  dot = QuantDotGeneral(weight=W4, act=A4, mode="fake")
  (y, (dx, dw)), module = sharded(dot, x, w, c, P("data", "tensor"), P("tensor", None))
  y1, (dx1, dw1) = one_device(dot, x, w, c)
  x_hat = np.abs(np.asarray(dequantize(quantize(x, A4, contract_axis=1)), np.float64))
  w_hat = np.abs(np.asarray(dequantize(quantize(w, W4, contract_axis=0)), np.float64))
  c_abs = np.abs(c.astype(np.float64))
  assert np.all(np.abs(y - y1) <= 2 * K * U * (x_hat @ w_hat))
  assert np.all(np.abs(dx - dx1) <= 2 * N * U * (c_abs @ w_hat.T))  # STE: dX = c W^T.
  assert np.all(np.abs(dw - dw1) <= 2 * M * U * (x_hat.T @ c_abs))  # dW = X^T c.
  assert reduced(module, "f32"), "the contraction was not split"
  # Not vacuous: the quantization moved y by far more than the tolerance.
  y_exact = x.astype(np.float64) @ w.astype(np.float64)
  assert np.abs(y1 - y_exact).max() > 1e3 * (2 * K * U * (x_hat @ w_hat)).max()


# -------------------------------------------------- the compiled program --


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def nontrivial(dims):
  return sorted(d for d in dims if d != 1)  # A kept layer dim of 1 is still one layer.


def fsdp_weights(runs):
  """{path: (stacked [L, ...] shape, one layer's shape, one layer's fsdp
  shard)} of the scanned params that the fsdp layout splits."""
  run = Run(smoke_config("", **LAYOUTS["fsdp"]))
  out = {}
  for (path, p), sh in zip(named_leaves(runs.state.params), jax.tree.leaves(run.state_sh.params)):
    axes = [a for e in sh.spec for a in (e if isinstance(e, tuple) else (e,))]
    if "['layers']" in path and "fsdp" in axes:
      out[path] = (p.shape, p.shape[1:], sh.shard_shape(p.shape)[1:])
  assert len(out) == 7, out  # q, k, v, o, gate, up, down.
  return out


def test_fsdp_gathers_one_layers_weights_at_a_time_inside_the_scan(runs):
  module = parse_hlo(runs.grads("", "fsdp")[2])
  weights = fsdp_weights(runs)
  stacks = [w[0] for w in weights.values()]
  layers = [nontrivial(w[1]) for w in weights.values()]
  in_loops = set().union(*(body for _, body in while_loops(module)))
  gathers = instructions(module, "all-gather", in_loops)
  assert len(gathers) >= len(weights), "the parse found no weight gathers in the scan"
  for g in gathers:  # Each gathers one layer's weight (forward and again in the backward).
    assert all(nontrivial(s) in layers for _, s in g.shapes), g
  for path, (_, layer, _) in weights.items():
    assert any(nontrivial(s) == nontrivial(layer) for g in gathers for _, s in g.shapes), path
  for g in instructions(module, "all-gather"):  # Never the stack, in a loop or before it.
    assert not any(same_dims(s, st) for _, s in g.shapes for st in stacks), g
  # Before / after the scan only unscanned params (the LM head) are gathered.
  unscanned = [p.shape for path, p in named_leaves(runs.state.params) if "['layers']" not in path]
  for g in instructions(module, "all-gather", set(module) - in_loops):
    for dtype, s in g.shapes:
      assert not dtype.startswith("f") or any(same_dims(s, u) for u in unscanned), g


def test_fsdp_reduces_each_layers_gradients_inside_the_scan(runs):
  """ZeRO-3's gradients: each layer's are reduced in the backward scan as it
  runs (reduce-scatter to the shard, or on CPU an all-reduce of the layer
  whose shard is kept), and no loop carries a whole stack of L layers."""
  module = parse_hlo(runs.grads("", "fsdp")[2])
  weights = fsdp_weights(runs)
  loops = while_loops(module)
  in_loops = set().union(*(body for _, body in loops))
  scattered = [s for i in instructions(module, "reduce-scatter", in_loops) for _, s in i.shapes]
  summed = [s for i in instructions(module, "all-reduce", in_loops) for _, s in i.shapes]
  for path, (_, layer, shard) in weights.items():
    assert (any(same_dims(s, shard) for s in scattered)
            or any(same_dims(s, layer) for s in summed)), f"{path}: no per-layer reduction"
  for w, _ in loops:
    for _, s in w.shapes:
      assert not any(same_dims(s, st) for st, _, _ in weights.values()), (w.name, s)


@pytest.mark.parametrize("layout", TENSOR)
def test_vocab_parallel_head_and_loss_never_gather_the_logits(runs, layout):
  """The logits stay split over the vocabulary (each device [B_local, T, V/t]);
  no collective moves as many values as one device's full-vocab logits. The
  loss (equal to one device's: test_loss_and_grads_equal_single_device)
  reduces per-token partial results across the shards instead."""
  module = parse_hlo(runs.grads("", layout)[2])
  mesh = LAYOUTS[layout]
  b_local = BATCH // (mesh.get("data", 1) * mesh.get("fsdp", 1))
  logits = b_local * SEQ * VOCAB
  for op in COLLECTIVES:
    for i in instructions(module, op):
      for _, s in i.shapes:
        assert int(np.prod(s)) < logits and not (VOCAB in s and SEQ in s), (op, s)
  per_token = [s for i in instructions(module, "all-reduce") for _, s in i.shapes]
  assert any(same_dims(s, (b_local, SEQ)) for s in per_token), "no vocab-parallel reduction"




@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_device_handles_other_data_shards_activations(runs, layout):
  """Batch parallelism: a device only ever holds activations of its own rows
  (B_local of them); no collective returns a [B, ...] activation of the whole
  global batch (weights are rank 2, or stacked [L, ...] never moved whole)."""
  module = parse_hlo(runs.grads("", layout)[2])
  mesh = LAYOUTS[layout]
  assert BATCH // (mesh.get("data", 1) * mesh.get("fsdp", 1)) < BATCH
  global_rows = [(op, s) for op in COLLECTIVES for i in instructions(module, op)
                 for dtype, s in i.shapes if dtype.startswith("f") and len(s) >= 3 and s[0] == BATCH]
  assert not global_rows, global_rows

HLO = """HloModule jit_f, entry_computation_layout={(f32[2,8,32]{2,1,0})->f32[]}

%fused (p0: f32[8,32]) -> f32[64,32] {
  %p0 = f32[8,32]{1,0} parameter(0)
  ROOT %ag.1 = f32[64,32]{1,0} all-gather(%p0), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
}

%body (p: (s32[], f32[2,8,32])) -> (s32[], f32[2,8,32]) {
  %p = (s32[], f32[2,8,32]{2,1,0}) parameter(0)
  %f = f32[64,32]{1,0} fusion(%p), kind=kLoop, calls=%fused
  ROOT %t = (s32[], f32[2,8,32]{2,1,0}) tuple(%i, %w)
}

%cond (p.1: (s32[], f32[2,8,32])) -> pred[] {
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

ENTRY %main (a: f32[2,8,32]) -> f32[] {
  %w = (s32[], f32[2,8,32]{2,1,0}) while(%t0), condition=%cond, body=%body
  %ar = (f32[64]{0}, /*index=1*/f32[512,64]{1,0}) all-reduce(%x, %y), channel_id=2, to_apply=%add
  ROOT %ag.2 = f32[2,64,32]{2,1,0} all-gather(%a), channel_id=3, dimensions={1}
}
"""


def test_hlo_parser_reads_tuples_and_what_a_loop_body_runs():
  module = parse_hlo(HLO)
  assert set(module) == {"fused", "body", "cond", "main"}
  [(loop, body)] = while_loops(module)
  assert loop.shapes == (("s32", ()), ("f32", (2, 8, 32)))
  assert body == {"body", "fused"}  # Through the fusion; the condition is not the body.
  assert [i.shapes for i in instructions(module, "all-gather", body)] == [(("f32", (64, 32)),)]
  [ar] = instructions(module, "all-reduce")
  assert ar.shapes == (("f32", (64,)), ("f32", (512, 64)))
  assert [i.name for i in instructions(module, "all-gather")] == ["ag.1", "ag.2"]

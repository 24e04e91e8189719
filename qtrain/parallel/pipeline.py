"""Pipeline schedules over the ``pipeline`` mesh axis: GPipe, circular, 1F1B.

The scanned stack's params [L, ...] are cut into p * v stages of K = L/(p v)
consecutive layers; stage j = r p + s runs on device s (its r-th *repeat*),
so with v > 1 a microbatch visits every device v times, in Megatron's
interleaved order (Narayanan et al. 2021). One SPMD tick program runs on
every device inside a ``shard_map`` manual over ``pipeline`` (the other axes
stay automatic: FSDP, tensor and data sharding inside a stage are XLA's);
each device works out from its index and the tick which microbatch and which
repeat it holds, and activations move to the next device by one
``ppermute`` per tick.

GPipe / circular (``forward``): microbatches are taken in groups of p; at
tick t device s works on local time u = t - s, group g = u // (v p),
repeat r = (u mod v p) // p, microbatch i = g p + u mod p. Every hand-over
then lands exactly one tick later on the next device of the ring, and the
program takes v m + p - 1 ticks of which each device is busy v m: the bubble
is (p - 1) / (v m + p - 1) (GPipe: v = 1, Huang et al. 2019). The backward
is autodiff through the tick scan, so every tick's residuals are kept
until the backward: activation memory grows with m.

1F1B (``one_f_one_b``, PipeDream-flush, Narayanan et al. 2021): each tick
has one forward slot and one backward slot. Stage s runs the forward of
microbatch i at tick i + s and its backward at tick i + 2(p - 1) - s; the
last stage computes the loss and its cotangent in the tick of the forward,
and cotangents travel back by the reverse ``ppermute``. The backward
recomputes the stage from its stashed input (``jax.vjp``), so a stage holds
at most 2(p - s) - 1 stage inputs, independent of m. With the idle slots
skipped (``lax.cond``) a tick costs the largest work on any device, and the
m + 2(p - 1) ticks cost (m + p - 1)(F + B): GPipe's bubble, with bounded
memory.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

AXIS = "pipeline"
SCHEDULES = ("gpipe", "circular", "1f1b")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A schedule's static shape: p devices, v repeats, m microbatches."""
  name: str
  p: int
  m: int
  v: int = 1

  @property
  def ticks(self) -> int:
    if self.name == "1f1b":
      return self.m + 2 * (self.p - 1)
    return self.v * self.m + self.p - 1

  @property
  def bubble(self) -> float:
    """The idle fraction of each device: (p - 1) / (v m + p - 1)."""
    return (self.p - 1) / (self.v * self.m + self.p - 1)


def schedule_of(cfg, p: int) -> Schedule:
  """The Schedule of ``config.train`` on a pipeline axis of size p."""
  t = cfg.train
  name = t.pipeline_schedule
  m = t.pipeline_microbatches or p
  v = t.pipeline_repeats if name == "circular" else 1
  return Schedule(name, p, m, v)


def forward_slot(t, s, sched: Schedule):
  """(microbatch i, repeat r, valid) device s runs at tick t (GPipe/circular)."""
  p, v, m = sched.p, sched.v, sched.m
  u = t - s
  valid = (u >= 0) & (u < v * m)
  u = jnp.clip(u, 0, v * m - 1)
  g, rem = u // (v * p), u % (v * p)
  return g * p + rem % p, rem // p, valid


def busy_ticks(sched: Schedule):
  """([ticks, p], [ticks, p]) bool: which device runs a forward and which a
  backward slot at each tick, from the slot rules the programs use (GPipe /
  circular: the backward is the forward scan transposed, so no backward slots
  here)."""
  t = jnp.arange(sched.ticks)[:, None]
  s = jnp.arange(sched.p)[None, :]
  if sched.name == "1f1b":
    fwd, bwd = t - s, t - 2 * (sched.p - 1) + s
    return (fwd >= 0) & (fwd < sched.m), (bwd >= 0) & (bwd < sched.m)
  fwd = forward_slot(t, s, sched)[2]
  return fwd, jnp.zeros_like(fwd)


def step_time(sched: Schedule, f: float, b: float) -> float:
  """The step's time when a stage's forward takes f and its backward b: each
  tick waits for the busiest device (the ppermute synchronises them). GPipe /
  circular run the forward ticks, then the same ticks transposed."""
  fwd, bwd = (jnp.asarray(a, jnp.float32) for a in busy_ticks(sched))
  if sched.name == "1f1b":
    return float(jnp.sum(jnp.max(f * fwd + b * bwd, axis=1)))
  return float(jnp.sum(jnp.max(fwd, axis=1)) * (f + b))


def to_stages(tree_L, sched: Schedule):
  """[L, ...] leaves -> [v, p, K, ...]: stage r p + s = layers (r p + s) K ..."""
  return jax.tree.map(lambda a: a.reshape(sched.v, sched.p, -1, *a.shape[1:]), tree_L)


def _rules_without_pipeline():
  """The active logical rules with ``pipeline`` removed: inside the shard_map
  the axis is manual, so a rule that splits activations (or the head's rows)
  over it outside the pipeline must not reach the stages."""
  def strip(axes):
    if isinstance(axes, (tuple, list)):
      return tuple(a for a in axes if a != AXIS) or None
    return None if axes == AXIS else axes
  return nn.logical_axis_rules(
      tuple((name, strip(axes)) for name, axes in nn.get_logical_axis_rules()))


def _manual_rules(body):
  """``body`` traced under ``_rules_without_pipeline``."""
  def run(*args):
    with _rules_without_pipeline():
      return body(*args)
  return run


def _ring(p: int, step: int):
  return [(j, (j + step) % p) for j in range(p)]


def forward(stage_fn, layers_L, x_MBTD, pos_MBT, seg_MBT, sched: Schedule, mesh):
  """The last stage's outputs [m, B/m, T, D] for microbatch inputs x_MBTD.

  ``stage_fn(params_K, x_BTD, pos_BT, seg_BT, layers_K)`` runs K layers.
  ``seg_MBT`` may be None. Differentiable: the backward is autodiff.
  """
  p, v = sched.p, sched.v
  K = jax.tree.leaves(layers_L)[0].shape[0] // (p * v)
  has_seg = seg_MBT is not None
  if not has_seg:
    seg_MBT = jnp.zeros(pos_MBT.shape, jnp.int32)

  dtype = x_MBTD.dtype

  @_manual_rules
  def body(params_V1K, x, pos, seg):
    params_VK = jax.tree.map(lambda a: a[:, 0], params_V1K)
    x = x.astype(dtype)
    s = jax.lax.axis_index(AXIS)

    def tick(carry, t):
      state, out = carry
      i, r, valid = forward_slot(t, s, sched)
      inp = jnp.where((s == 0) & (r == 0), x[i], state)
      params_K = jax.tree.map(lambda a: a[r], params_VK)
      ids_K = (r * p + s) * K + jnp.arange(K, dtype=jnp.int32)
      y = stage_fn(params_K, inp, pos[i], seg[i] if has_seg else None, ids_K)
      last = (s == p - 1) & (r == v - 1) & valid
      out = out.at[i].set(jnp.where(last, y, out[i]))
      return (jax.lax.ppermute(y, AXIS, _ring(p, 1)), out), None

    init = (jnp.zeros_like(x[0]), jnp.zeros_like(x))
    (_, out), _ = jax.lax.scan(tick, init, jnp.arange(sched.ticks))
    return out[None]

  # check_vma off: the tick program mixes per-device values (the stage's
  # params, the received state) with replicated inputs under selects. The
  # inputs enter in float32: their cotangent is summed over the pipeline
  # axis (stage 0's), and XLA:CPU's all-reduce promotion fails on a bfloat16 one.
  out = jax.shard_map(body, mesh=mesh, in_specs=(P(None, AXIS), P(), P(), P()),
                      out_specs=P(AXIS), axis_names={AXIS}, check_vma=False)(
                          to_stages(layers_L, sched), x_MBTD.astype(jnp.float32), pos_MBT,
                          seg_MBT)
  return out[p - 1]


def _zeros_f32(tree):
  return jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), tree)


def _f32(tree):
  return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def _add_f32(acc, tree):
  return jax.tree.map(lambda s, g: s + g.astype(jnp.float32), acc, tree)


def one_f_one_b(stage_fn, head_fn, layers_L, head_params, x_MBTD, pos_MBT, seg_MBT, micro_M,
                scale, sched: Schedule, mesh):
  """Gradients of sum_i head_fn(head_params, stages(x_i), micro_i) * scale by the
  1F1B schedule (see the module docstring).

  ``head_fn(head_params, y_BTD, micro, i) -> (value, aux)`` is the last stage's
  loss of microbatch i (aux: a dict of float32 scalars, summed over
  microbatches); ``micro_M`` its per-microbatch arrays, [m, B/m, ...].
  Returns (layer grads [L, ...] float32, head grads float32, d x_MBTD, aux sums).
  """
  p, m = sched.p, sched.m
  K = jax.tree.leaves(layers_L)[0].shape[0] // p
  S = 2 * p - 1  # Stashed stage inputs: stage 0 keeps microbatch i from tick i to i + 2(p-1).
  has_seg = seg_MBT is not None
  if not has_seg:
    seg_MBT = jnp.zeros(pos_MBT.shape, jnp.int32)

  @_manual_rules
  def body(params_K, head_p, x, pos, seg, micro, scale):
    s = jax.lax.axis_index(AXIS)
    ids_K = s * K + jnp.arange(K, dtype=jnp.int32)
    run = lambda prm, x_in, i: stage_fn(prm, x_in, pos[i], seg[i] if has_seg else None, ids_K)
    zero_x = jnp.zeros_like(x[0])
    aux_shape = jax.eval_shape(lambda: head_fn(head_p, zero_x, _at(micro, 0), 0)[1])
    zero_aux = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux_shape)

    def head(y, i):  # The loss of microbatch i and its cotangent, at the last stage.
      _, vjp, aux = jax.vjp(lambda hp, yy: head_fn(hp, yy, _at(micro, i), i), head_p, y,
                            has_aux=True)
      d_head, dy = vjp(scale)
      return dy, _f32(d_head), _f32(aux)

    def backward(g_out, i, stash):  # Recomputes the stage from its stashed input.
      _, vjp = jax.vjp(lambda prm, xx: run(prm, xx, i), params_K, stash[i % S])
      d_params, dx = vjp(g_out)
      return _f32(d_params), dx

    def tick(carry, t):
      fwd_in, bwd_in, stash, g_layers, g_head, dx_out, sums = carry
      i_f, i_b = t - s, t - 2 * (p - 1) + s
      f_ok, b_ok = (i_f >= 0) & (i_f < m), (i_b >= 0) & (i_b < m)
      i_f, i_b = jnp.clip(i_f, 0, m - 1), jnp.clip(i_b, 0, m - 1)
      x_in = jnp.where(s == 0, x[i_f], fwd_in)
      y = jax.lax.cond(f_ok, lambda: run(params_K, x_in, i_f), lambda: zero_x)
      stash = stash.at[i_f % S].set(jnp.where(f_ok, x_in, stash[i_f % S]))
      dy, d_head, aux = jax.lax.cond(f_ok & (s == p - 1), lambda: head(y, i_f),
                                     lambda: (zero_x, _zeros_f32(head_p), zero_aux))
      g_out = jnp.where(s == p - 1, dy, bwd_in)
      d_params, dx = jax.lax.cond(b_ok, lambda: backward(g_out, i_b, stash),
                                  lambda: (_zeros_f32(params_K), zero_x))
      dx_out = dx_out.at[i_b].set(jnp.where(b_ok & (s == 0), dx, dx_out[i_b]))
      carry = (jax.lax.ppermute(y, AXIS, _ring(p, 1)), jax.lax.ppermute(dx, AXIS, _ring(p, -1)),
               stash, _add_f32(g_layers, d_params), _add_f32(g_head, d_head), dx_out,
               _add_f32(sums, aux))
      return carry, None

    init = (zero_x, zero_x, jnp.zeros((S, *zero_x.shape), zero_x.dtype), _zeros_f32(params_K),
            _zeros_f32(head_p), jnp.zeros_like(x), zero_aux)
    (_, _, _, g_layers, g_head, dx_out, sums), _ = jax.lax.scan(tick, init,
                                                                 jnp.arange(sched.ticks))
    # Only the last stage holds head grads and loss sums, only stage 0 dx.
    g_head, sums = jax.lax.psum((g_head, sums), AXIS)
    return g_layers, g_head, dx_out[None], sums

  g_layers, g_head, dx, sums = jax.shard_map(
      body, mesh=mesh, in_specs=(P(AXIS), P(), P(), P(), P(), P(), P()),
      out_specs=(P(AXIS), P(), P(AXIS), P()), axis_names={AXIS}, check_vma=False)(
          layers_L, head_params, x_MBTD, pos_MBT, seg_MBT, micro_M, scale)
  return g_layers, g_head, dx[0], sums


def _at(tree, i):
  return jax.tree.map(lambda a: a[i], tree)

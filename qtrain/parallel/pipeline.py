"""Pipeline schedules over the ``pipeline`` mesh axis: GPipe, circular, 1F1B,
interleaved 1F1B.

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

Interleaved 1F1B (``interleaved_1f1b``, Megatron-LM's virtual-stage
schedule, Narayanan et al. 2021 sec. 2.2): 1F1B's tick program over the
circular layout, v >= 2 repeats. Device s takes its forwards in circular's
order (k-th forward: group g = k // (v p), repeat r = (k mod v p) // p,
microbatch g p + k mod p) at tick k + s, and its backwards in the same order
with the repeats reversed (r -> v - 1 - r) at tick k + (v + 1) p - 2 - s.
Then stage j = r p + s hands its output to stage j + 1 (on device s + 1,
or device 0 for the next repeat) exactly one tick later and its cotangent to
stage j - 1 one tick later, and the last stage's loss feeds its own backward
in the same tick, as in 1F1B. Per device this is Megatron's order exactly:
(v + 1) p - 2 - 2s warm-up forwards (Megatron: 2(p - s - 1) + (v - 1) p),
then one forward and one backward per tick, then the cool-down backwards.
``tick_tables`` writes the plan out as static [ticks, p] tables (1F1B is its
v = 1 case); the stage inputs live in stash slots the tables assign, at most
(v + 1) p - 1 - 2s on device s, independent of m. The v m + (v + 1) p - 2
ticks cost (v m + p - 1)(f + b) with f, b a virtual stage's forward and
backward (= F/v, B/v): the bubble is (p - 1) / (v m + p - 1), circular's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

AXIS = "pipeline"
SCHEDULES = ("gpipe", "circular", "1f1b", "interleaved_1f1b")
# Schedules with a backward slot per tick (``one_f_one_b``); the others are
# differentiated through the forward's tick scan.
ONE_F_ONE_B = ("1f1b", "interleaved_1f1b")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A schedule's static shape: p devices, v repeats, m microbatches."""
  name: str
  p: int
  m: int
  v: int = 1

  @property
  def ticks(self) -> int:
    if self.name in ONE_F_ONE_B:  # The last backward: device 0's (v m - 1)-th, see tick_tables.
      return self.v * self.m + (self.v + 1) * self.p - 2
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
  v = t.pipeline_repeats if name in ("circular", "interleaved_1f1b") else 1
  return Schedule(name, p, m, v)


def forward_slot(t, s, sched: Schedule):
  """(microbatch i, repeat r, valid) device s runs at tick t (GPipe/circular)."""
  p, v, m = sched.p, sched.v, sched.m
  u = t - s
  valid = (u >= 0) & (u < v * m)
  u = jnp.clip(u, 0, v * m - 1)
  g, rem = u // (v * p), u % (v * p)
  return g * p + rem % p, rem // p, valid


class TickTables(NamedTuple):
  """The static plan of a 1F1B / interleaved 1F1B program: [ticks, p] int32
  tables, entry [t, s] for device s at tick t. An idle slot has ok 0 and
  microbatch, repeat and stash slot 0. The stage input of the forward slot
  is stashed in ``f_slot`` and read back by the backward of the same
  (microbatch, repeat) from ``b_slot``; ``slots`` is the stash's size."""
  f_mb: np.ndarray
  f_rep: np.ndarray
  f_ok: np.ndarray
  f_slot: np.ndarray
  b_mb: np.ndarray
  b_rep: np.ndarray
  b_ok: np.ndarray
  b_slot: np.ndarray
  slots: int

  def stacked(self) -> np.ndarray:
    """[ticks, p, 8]: the tables in field order, the scan's per-tick input."""
    return np.stack(self[:8], axis=-1)


def _megatron_order(k: int, p: int, v: int) -> tuple[int, int]:
  """(microbatch, repeat) of a device's k-th forward: groups of p
  microbatches, each group through repeat 0, ..., v - 1 (circular's order)."""
  g, rem = divmod(k, v * p)
  return g * p + rem % p, rem // p


@functools.cache
def tick_tables(sched: Schedule) -> TickTables:
  """The plan of ``one_f_one_b`` (the module docstring states its rules):
  device s runs its k-th forward at tick k + s and its k-th backward (the
  repeats reversed) at tick k + (v + 1) p - 2 - s; stash slots are the
  lowest free ones, a slot freed by its backward after the tick's forward
  has written (the last stage reads the input it stashed in the same tick)."""
  p, v, m = sched.p, sched.v, sched.m
  if sched.name not in ONE_F_ONE_B:
    raise ValueError(f"{sched.name!r} has no backward slots (its backward is autodiff)")
  if v > 1 and m % p:
    raise ValueError(f"interleaved 1F1B takes microbatches in groups of p: m={m} is not a "
                     f"multiple of p={p}")
  tables = {f: np.zeros((sched.ticks, p), np.int32) for f in TickTables._fields[:8]}
  for s in range(p):
    for k in range(v * m):
      i, r = _megatron_order(k, p, v)
      t = k + s
      tables["f_mb"][t, s], tables["f_rep"][t, s], tables["f_ok"][t, s] = i, r, 1
      t = k + (v + 1) * p - 2 - s
      tables["b_mb"][t, s], tables["b_rep"][t, s], tables["b_ok"][t, s] = i, v - 1 - r, 1
  slots = 0
  for s in range(p):
    free, held = [], {}
    for t in range(sched.ticks):
      if tables["f_ok"][t, s]:
        slot = min(free) if free else len(held)  # Slots 0..len(held)-1 are all held.
        if free:
          free.remove(slot)
        held[(tables["f_mb"][t, s], tables["f_rep"][t, s])] = slot
        tables["f_slot"][t, s] = slot
        slots = max(slots, slot + 1)
      if tables["b_ok"][t, s]:
        slot = held.pop((tables["b_mb"][t, s], tables["b_rep"][t, s]))
        tables["b_slot"][t, s] = slot
        free.append(slot)
  for a in tables.values():
    a.flags.writeable = False  # Cached: shared by every caller.
  return TickTables(**tables, slots=slots)


def busy_ticks(sched: Schedule):
  """([ticks, p], [ticks, p]) bool: which device runs a forward and which a
  backward slot at each tick, from the slot rules the programs use (GPipe /
  circular: the backward is the forward scan transposed, so no backward slots
  here)."""
  if sched.name in ONE_F_ONE_B:
    tables = tick_tables(sched)
    return jnp.asarray(tables.f_ok, bool), jnp.asarray(tables.b_ok, bool)
  t = jnp.arange(sched.ticks)[:, None]
  s = jnp.arange(sched.p)[None, :]
  fwd = forward_slot(t, s, sched)[2]
  return fwd, jnp.zeros_like(fwd)


def step_time(sched: Schedule, f: float, b: float) -> float:
  """The step's time when a stage's forward takes f and its backward b: each
  tick waits for the busiest device (the ppermute synchronises them). GPipe /
  circular run the forward ticks, then the same ticks transposed."""
  fwd, bwd = (jnp.asarray(a, jnp.float32) for a in busy_ticks(sched))
  if sched.name in ONE_F_ONE_B:
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
  1F1B schedule, interleaved when sched.v > 1 (see the module docstring).

  ``head_fn(head_params, y_BTD, micro, i) -> (value, aux)`` is the last stage's
  loss of microbatch i (aux: a dict of float32 scalars, summed over
  microbatches); ``micro_M`` its per-microbatch arrays, [m, B/m, ...].
  Returns (layer grads [L, ...] float32, head grads float32, d x_MBTD, aux sums).
  """
  p, v = sched.p, sched.v
  K = jax.tree.leaves(layers_L)[0].shape[0] // (p * v)
  tables = tick_tables(sched)
  has_seg = seg_MBT is not None
  if not has_seg:
    seg_MBT = jnp.zeros(pos_MBT.shape, jnp.int32)

  @_manual_rules
  def body(params_V1K, head_p, x, pos, seg, micro, scale):
    params_VK = jax.tree.map(lambda a: a[:, 0], params_V1K)
    s = jax.lax.axis_index(AXIS)

    def run(params_K, x_in, i, r):  # Stage r p + s: layers (r p + s) K, ..., + K - 1.
      ids_K = (r * p + s) * K + jnp.arange(K, dtype=jnp.int32)
      return stage_fn(params_K, x_in, pos[i], seg[i] if has_seg else None, ids_K)

    chunk = lambda r: jax.tree.map(lambda a: a[r], params_VK)

    zero_x = jnp.zeros_like(x[0])
    aux_shape = jax.eval_shape(lambda: head_fn(head_p, zero_x, _at(micro, 0), 0)[1])
    zero_aux = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux_shape)
    zero_grads = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape[1:], jnp.float32), params_VK)

    def head(y, i):  # The loss of microbatch i and its cotangent, at the last stage.
      _, vjp, aux = jax.vjp(lambda hp, yy: head_fn(hp, yy, _at(micro, i), i), head_p, y,
                            has_aux=True)
      d_head, dy = vjp(scale)
      return dy, _f32(d_head), _f32(aux)

    def backward(g_out, i, r, x_in):  # Recomputes the stage from its stashed input.
      _, vjp = jax.vjp(lambda prm, xx: run(prm, xx, i, r), chunk(r), x_in)
      d_params, dx = vjp(g_out)
      return _f32(d_params), dx

    def tick(carry, row):
      fwd_in, bwd_in, stash, g_layers, g_head, dx_out, sums = carry
      i_f, r_f, f_ok, f_slot, i_b, r_b, b_ok, b_slot = (row[s, k] for k in range(8))
      f_ok, b_ok = f_ok > 0, b_ok > 0
      x_in = jnp.where((s == 0) & (r_f == 0), x[i_f], fwd_in)
      y = jax.lax.cond(f_ok, lambda: run(chunk(r_f), x_in, i_f, r_f), lambda: zero_x)
      stash = stash.at[f_slot].set(jnp.where(f_ok, x_in, stash[f_slot]))
      last = (s == p - 1) & (r_f == v - 1)  # The last stage: its loss and cotangent.
      dy, d_head, aux = jax.lax.cond(f_ok & last, lambda: head(y, i_f),
                                     lambda: (zero_x, _zeros_f32(head_p), zero_aux))
      # The tables put the last stage's backward in its forward's tick.
      g_out = jnp.where((s == p - 1) & (r_b == v - 1), dy, bwd_in)
      d_params, dx = jax.lax.cond(b_ok, lambda: backward(g_out, i_b, r_b, stash[b_slot]),
                                  lambda: (zero_grads(), zero_x))
      g_layers = jax.tree.map(lambda acc, g: acc.at[r_b].add(g), g_layers, d_params)
      first = b_ok & (s == 0) & (r_b == 0)
      dx_out = dx_out.at[i_b].set(jnp.where(first, dx, dx_out[i_b]))
      carry = (jax.lax.ppermute(y, AXIS, _ring(p, 1)), jax.lax.ppermute(dx, AXIS, _ring(p, -1)),
               stash, g_layers, _add_f32(g_head, d_head), dx_out, _add_f32(sums, aux))
      return carry, None

    init = (zero_x, zero_x, jnp.zeros((tables.slots, *zero_x.shape), zero_x.dtype),
            _zeros_f32(params_VK), _zeros_f32(head_p), jnp.zeros_like(x), zero_aux)
    (_, _, _, g_layers, g_head, dx_out, sums), _ = jax.lax.scan(
        tick, init, jnp.asarray(tables.stacked()))
    # Only the last stage holds head grads and loss sums, only stage 0 dx.
    g_head, sums = jax.lax.psum((g_head, sums), AXIS)
    return jax.tree.map(lambda a: a[:, None], g_layers), g_head, dx_out[None], sums

  g_layers, g_head, dx, sums = jax.shard_map(
      body, mesh=mesh, in_specs=(P(None, AXIS), P(), P(), P(), P(), P(), P()),
      out_specs=(P(None, AXIS), P(), P(AXIS), P()), axis_names={AXIS}, check_vma=False)(
          to_stages(layers_L, sched), head_params, x_MBTD, pos_MBT, seg_MBT, micro_M, scale)
  g_layers = jax.tree.map(lambda a: a.reshape(-1, *a.shape[3:]), g_layers)  # [v, p, K] -> [L].
  return g_layers, g_head, dx[0], sums


def _at(tree, i):
  return jax.tree.map(lambda a: a[i], tree)

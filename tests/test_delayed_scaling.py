"""Delayed fp8 scaling (qtrain/quant/delayed.py, ``config.quant.amax_history``).

References: the current-scaling matmul and train step (a history holding the
tensors' own absmaxes must give their scales, so the same bits), and float64
NumPy with ml_dtypes' float8 casts for a history that disagrees with the
tensor (saturation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from parallel_util import Run, batch, save_restore, smoke_config

from qtrain.config.validate import ConfigError, validate
from qtrain.data.global_batch import to_global
from qtrain.quant import delayed
from qtrain.quant import dot_general as dg
from qtrain.quant.spec import QuantSpec
from qtrain.train.resume import check_resume
from qtrain.train.step import make_seed_step, make_steps

E4 = QuantSpec(format="fp8_e4m3", granularity="tensor", scale_pow2=True)
DIMS = (((1,), (0,)), ((), ()))


def _matmul(kernels: str):
  """(y, (dx, dw, d_hist)) of sum(y * c) through the per-tensor fp8 matmul."""
  spec = dg.DotSpec(weight=E4, act=E4, mode="fp8", kernels=kernels)
  cfg = dg._Lowp(act=E4, weight=E4, grad=dg._grad_spec(spec, False), acc_dtype=jnp.float32,
                 x_dtype=jnp.float32, w_dtype=jnp.float32, out_dtype=jnp.float32,
                 kernels=kernels, tensorwise=True)

  def f(x, w, h, c):
    return jnp.sum(dg.lowp_matmul(x, w, None, h, cfg) * c)
  return jax.jit(jax.value_and_grad(f, (0, 1, 2)))


def _operands():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_t(4, size=(128, 192)) * 3, jnp.float32)
  w = jnp.asarray(rng.normal(size=(192, 64)) * 0.05, jnp.float32)
  c = jnp.asarray(rng.normal(size=(128, 64)) * 1e-4, jnp.float32)  # dY
  return x, w, c


@pytest.mark.parametrize("kernels", ["xla", "interpret"])
def test_history_of_the_own_absmaxes_is_current_scaling(kernels):
  """A history whose largest entries are X's, W's and dY's own absmaxes
  (placed in column 2, behind smaller ones: the scale is the history's max)
  gives the current-scaling matmul bit for bit, forward and backward; the
  history's cotangent is exactly those absmaxes in column 0, zero elsewhere
  (from the cast kernel's own read under 'interpret')."""
  x, w, c = _operands()
  own = np.array([np.abs(x).max(), np.abs(w).max(), np.abs(c).max()], np.float32)
  hist = np.zeros((3, 4), np.float32)
  hist[:, 2] = own
  hist[:, 0] = own / 3
  ref_y, (ref_dx, ref_dw, _) = _matmul(kernels)(x, w, None, c)
  y, (dx, dw, d_hist) = _matmul(kernels)(x, w, jnp.asarray(hist), c)
  assert float(y) == float(ref_y)
  np.testing.assert_array_equal(np.asarray(dx), np.asarray(ref_dx))
  np.testing.assert_array_equal(np.asarray(dw), np.asarray(ref_dw))
  want = np.zeros_like(hist)
  want[:, 0] = own
  np.testing.assert_array_equal(np.asarray(d_hist), want)


def _fp8(v, dtype):
  return np.clip(v, -float(ml_dtypes.finfo(dtype).max),
                 float(ml_dtypes.finfo(dtype).max)).astype(dtype).astype(np.float64)


def test_a_stale_history_saturates_as_the_float64_reference():
  """X's history at a quarter of its absmax: the scale is the history's
  (power of two above amax / 448), X's largest values clip at 448 codes; W
  and dY at their own. y, dX and dW against float64 products of float8
  codes cast by ml_dtypes (the same rounding, to nearest even); tolerance
  1e-5 of each output's largest entry (float32 accumulation over K = 192 and
  M = 128 products against float64)."""
  x, w, c = _operands()
  xs, ws, cs = (np.asarray(a, np.float64) for a in (x, w, c))
  hist = np.zeros((3, 2), np.float32)
  hist[:, 1] = [np.abs(xs).max() / 4, np.abs(ws).max(), np.abs(cs).max()]
  y, (dx, dw, _) = _matmul("xla")(x, w, jnp.asarray(hist), c)
  pow2 = lambda a, top: 2.0 ** np.ceil(np.log2(a / top))
  s_x, s_w = pow2(hist[0, 1], 448.0), pow2(hist[1, 1], 448.0)
  s_g = pow2(hist[2, 1], 57344.0)
  q_x = _fp8(xs / s_x, ml_dtypes.float8_e4m3fn)
  assert np.abs(q_x).max() == 448.0 and np.sum(np.abs(q_x) == 448.0) > 1  # It saturates.
  q_w = _fp8(ws / s_w, ml_dtypes.float8_e4m3fn)
  q_g = _fp8(cs / s_g, ml_dtypes.float8_e5m2)
  want_y = np.sum((q_x @ q_w) * s_x * s_w * cs)
  want_dx = (q_g @ q_w.T) * s_g * s_w
  want_dw = (q_x.T @ q_g) * s_x * s_g
  assert abs(float(y) - want_y) <= 1e-5 * abs(want_y)
  for got, want in ((dx, want_dx), (dw, want_dw)):
    assert np.abs(np.asarray(got) - want).max() <= 1e-5 * np.abs(want).max()


def _steps(cfg):
  run = Run(cfg)
  with run.layout:
    train, _ = make_steps(cfg, run.model, run.tx, run.mesh, run.state_sh)
    seed = make_seed_step(cfg, run.model, run.tx, run.mesh, run.state_sh)
  return run, train, seed


def test_first_delayed_step_is_the_current_scaling_step_then_histories_shift(tmp_path):
  """llama_1b's layout (fused q/k/v and gate/up, one history per joined
  dot): the seeding pass on the first batch, then the step, equals the
  current-scaling step bit for bit (loss and params); a second step shifts
  the histories by one column; they survive a checkpoint round trip; with
  gradient accumulation they combine by maximum; checkpoints without them
  keep the old layout. (One test: the compiled steps are shared.)"""
  def cfg(preset):
    c = smoke_config(preset)
    c.model.update(fused_qkv=True, fused_mlp=True)
    return c
  cur, cur_train, none = _steps(cfg("fp8+tensor"))
  run, train, seed = _steps(cfg("fp8+tensor+delayed"))
  assert none is None and seed is not None
  state = run.init_state()
  hists = jax.tree_util.tree_flatten_with_path(state.amax)[0]
  names = {jax.tree_util.keystr(p) for p, _ in hists}
  assert "['decoder']['layers']['attn']['q_proj+k_proj+v_proj']" in names, names
  assert "['decoder']['layers']['mlp']['gate_proj+up_proj']" in names, names
  assert all(h.shape == (2, 3, 16) and not h.any() for _, h in hists)  # [L, X/W/dY, H]
  with run.layout:
    b0, b1 = to_global(batch(0), run.mesh), to_global(batch(1), run.mesh)
    seeded = seed(jax.device_put(state, run.state_sh), b0)
    first = jax.tree.map(np.asarray, seeded.amax)
    s1, m1 = train(seeded, b0)
    s1_host = jax.tree.map(np.asarray, s1)  # s1 is donated to the next step.
    s2, m2 = train(s1, b1)
    after1, after2 = s1_host.amax, jax.tree.map(np.asarray, s2.amax)
  with cur.layout:
    c1, cm1 = cur_train(jax.device_put(cur.init_state(), cur.state_sh),
                        to_global(batch(0), cur.mesh))
  assert float(m1["loss"]) == float(cm1["loss"])
  for a, b in zip(jax.tree.leaves(s1_host.params), jax.tree.leaves(c1.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.isfinite(float(m2["loss"]))
  for h0, h1, h2 in zip(*(jax.tree.leaves(t) for t in (first, after1, after2))):
    assert (h0[..., 0] > 0).all() and not h0[..., 1:].any()
    np.testing.assert_array_equal(h1[..., 0], h0[..., 0])  # Same params, same batch.
    np.testing.assert_array_equal(h2[..., 1:3], h1[..., 0:2])
    assert not np.array_equal(h2[..., 0], h1[..., 0])
  restored = save_restore(run, run.tx, run.state_sh, s2, tmp_path / "delayed", 2)
  for a, b in zip(jax.tree.leaves(restored.amax), jax.tree.leaves(after2)):
    np.testing.assert_array_equal(np.asarray(a), b)

  # Two microbatches: the seeded X and W absmaxes are the whole batch's (the
  # larger of the two microbatches'), equal to the unsplit seeding's.
  split_cfg = cfg("fp8+tensor+delayed")
  split_cfg.train.grad_accum_steps = 2
  split, _, seed_split = _steps(split_cfg)
  with split.layout:
    b = seed_split(jax.device_put(state, split.state_sh), to_global(batch(0), split.mesh)).amax
  for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x[..., :2, 0], np.asarray(y)[..., :2, 0])
    assert (np.asarray(y)[..., 2, 0] > 0).all()

  # Without delayed scaling a checkpoint holds the fields it held before
  # TrainState.amax existed (so those restore, with no histories); toggling
  # amax_history on a resume is refused by name.
  plain = cur.init_state()
  assert plain.amax == {}
  restored = save_restore(cur, cur.tx, cur.state_sh, plain, tmp_path / "plain", 0)
  assert isinstance(restored, type(plain)) and restored.amax == {}
  meta = ocp.PyTreeCheckpointer().metadata(str(tmp_path / "plain" / "0" / "state"))
  assert set(meta.item_metadata.tree) == {"step", "params", "opt_state", "skipped", "rng"}
  with pytest.raises(ConfigError, match=r"config\.quant\.amax_history=16, but its checkpoints "
                     r"hold no amax histories"):
    check_resume(cur.cfg, run.cfg, str(tmp_path))


def test_advance_skips_a_non_finite_step():
  h = jnp.asarray([[1.0, 2.0, 3.0]])
  c = jnp.asarray([[5.0, 0.0, 0.0]])
  np.testing.assert_array_equal(delayed.advance(h, c), [[5.0, 1.0, 2.0]])
  np.testing.assert_array_equal(delayed.advance(h, c, jnp.bool_(False)), h)
  np.testing.assert_array_equal(delayed.advance(h, c * jnp.inf), h)


@pytest.mark.parametrize("edit,field", [
    (lambda c: c.quant.update(amax_history=-1), "amax_history=-1"),
    (lambda c: c.quant.update(mode="int8"), "mode='int8'"),
    (lambda c: c.quant.rules.linears.act.update(granularity="token"), "granularity='token'"),
    (lambda c: c.quant.update(int8_backward=False), "int8_backward"),
    (lambda c: c.train.update(step="zeroth_order"), "step='zeroth_order'"),
])
def test_config_errors_name_the_field(edit, field):
  cfg = smoke_config("fp8+tensor+delayed")
  with cfg.unlocked():
    edit(cfg)
  with pytest.raises((ConfigError, ValueError), match=field.replace("(", r"\(")):
    validate(cfg)


"""The zeroth-order step family (qtrain/train/zeroth_order.py): the estimators
against the true gradient of a quadratic (mean and variance over seeds), the
forward gradient against grad . z, the updates against float64 NumPy and optax,
params restored bit-identically, ZeroQAT moving only quantizer steps, the
compiled MeZO step's memory, and resume replaying the same directions."""

from __future__ import annotations

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from qtrain.config import ConfigError, base_config, validate
from qtrain.optim.groups import param_path
from qtrain.train import zeroth_order as zo
from qtrain.train.loss import make_loss
from test_steps import _Run, _batch

D1, D2 = 5, 7  # Two leaves of a quadratic in R^12.


def _quadratic(seed=0):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(D1 + D2, D1 + D2))
  a = m @ m.T / (D1 + D2) + np.eye(D1 + D2)  # Positive definite.
  b = rng.normal(size=D1 + D2)
  theta = rng.normal(size=D1 + D2)
  params = {"u": jnp.asarray(theta[:D1], jnp.float32), "w": jnp.asarray(theta[D1:], jnp.float32)}
  a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)

  def loss_fn(p, batch, rng):
    del batch, rng
    x = jnp.concatenate([p["u"], p["w"]])
    return 0.5 * x @ a32 @ x + b32 @ x, {}

  return params, loss_fn, a @ theta + b  # The true gradient, float64.


def _zo_cfg(**zo_fields):
  c = base_config()
  c.zo.update(**zo_fields)
  return c


def _samples(cfg, params, loss_fn, n):
  """g_hat (flattened, [n, 12]) and g_q ([n, Q]) over n seeds."""
  leaves = zo.leaves_of(cfg, params)

  def one(seed):
    qkey = zo.query_keys(jax.random.key(seed), cfg.zo.rng)
    gs, _, _ = zo.estimate(cfg, loss_fn, params, None, None, qkey, leaves)
    g_hat = zo.estimated_gradient(params, qkey, gs, leaves)
    return jnp.concatenate([g_hat["u"], g_hat["w"]]), gs

  # lax.map, not vmap: a batched RngBitGenerator draws other bits than one call.
  return jax.jit(lambda seeds: jax.lax.map(one, seeds))(jnp.arange(n))


@pytest.mark.parametrize("estimator, queries", [("spsa", 1), ("forward", 1), ("spsa", 4)])
def test_estimators_mean_and_variance_match_the_quadratic(estimator, queries):
  """On L = x^T A x / 2 + b^T x, both estimators give g_hat = (1/Q) sum z z^T grad
  (SPSA exactly: the quadratic terms cancel in L(x + eps z) - L(x - eps z)).
  For z ~ N(0, I): E[g_hat_i] = grad_i and Var[g_hat_i] = (||grad||^2 + grad_i^2) / Q
  (E[z_i^2 z_j^2] = 1 + 2 delta_ij). Mean of N = 4000 seeds: |mean_i - grad_i|
  <= 5 sd_i with sd_i = sqrt(Var_i / N) (CLT; P(any of 12 beyond 5 sd) ~ 7e-6).
  Sample variance: g_hat_i is a product of Gaussians (kurtosis up to 15 at Q=1),
  so its relative standard error is <= sqrt(14 / N) ~ 6%; bound 25%."""
  params, loss_fn, grad = _quadratic()
  n = 4000
  g_hat, _ = _samples(_zo_cfg(estimator=estimator, queries=queries), params, loss_fn, n)
  g_hat = np.asarray(g_hat, np.float64)
  var = (grad @ grad + grad ** 2) / queries
  assert np.all(np.abs(g_hat.mean(0) - grad) <= 5 * np.sqrt(var / n)), (g_hat.mean(0), grad)
  np.testing.assert_allclose(g_hat.var(0), var, rtol=0.25)


def test_spsa_and_each_jvp_equal_grad_dot_z():
  """Per seed: the forward gradient's g equals grad . z (float32, rtol 1e-5);
  SPSA's equals it up to float32 rounding of L(+) and L(-), which the
  difference does not cancel: a few ulps of |L| each (a sum of 156 float32
  terms), divided by 2 eps. Bound: 8 ulps of max |L| per loss."""
  params, loss_fn, grad = _quadratic()
  _, g_fwd = _samples(_zo_cfg(estimator="forward"), params, loss_fn, 64)
  _, g_spsa = _samples(_zo_cfg(estimator="spsa"), params, loss_fn, 64)
  cfg = _zo_cfg()
  leaves = zo.leaves_of(cfg, params)
  z = np.stack([np.concatenate([np.asarray(x) for x in zo.directions(
      zo.query_keys(jax.random.key(s), cfg.zo.rng)(0), params, leaves)]) for s in range(64)])
  np.testing.assert_allclose(np.asarray(g_fwd[:, 0]), z @ grad, rtol=1e-5, atol=1e-5)
  l_max = max(abs(float(loss_fn(params, None, None)[0])), 1.0) * 1.5  # |L(p +/- eps z)| < this.
  eps = cfg.zo.eps
  atol = 2 * 8 * np.finfo(np.float32).eps * l_max / (2 * eps)
  assert atol < 0.05 * np.median(np.abs(z @ grad))  # Still a sharp check.
  np.testing.assert_allclose(np.asarray(g_spsa[:, 0]), z @ grad, atol=atol)


def _cfg(preset="", **zo_fields):
  """The smoke model (d 64) with 4 layers and vocab 128 (the layers hold 90% of
  the params, as in a Llama: the per-layer memory shows), 2 rows of 16 tokens,
  one device."""
  c = default.get_config(",".join(filter(None, ("smoke", preset))))
  c.model.update(vocab_size=128, n_layers=4)
  c.data.update(seq_len=16, global_batch_size=2)
  c.mesh.data = 1
  c.train.step = "zeroth_order"
  c.optim.update(name="sgd", grad_clip=0.0, warmup_steps=0, lr=1e-2, weight_decay=0.1)
  c.zo.update(**zo_fields)
  return c


class _OneDevice(_Run):
  """_Run on a one-device mesh: one device compiles faster than eight, and
  memory is per device with nothing split."""

  def __init__(self, cfg, model=None):
    from qtrain.parallel import Layout  # pylint: disable=g-import-not-at-top
    from qtrain.optim import build_optimizer  # pylint: disable=g-import-not-at-top
    from qtrain.train import abstract_params, init_state, make_steps, state_shardings  # pylint: disable=g-import-not-at-top
    from qtrain.train.build import build_model  # pylint: disable=g-import-not-at-top
    validate(cfg, n_devices=1)
    self.cfg, self.model = cfg, model or build_model(cfg)
    self.layout = Layout.from_config(cfg, devices=jax.devices()[:1])
    self.mesh = self.layout.mesh
    seq = cfg.data.seq_len
    with self.layout:
      self.tx = build_optimizer(cfg, abstract_params(self.model, seq))
      self.sh = state_shardings(self.model, self.tx, self.mesh, seq)
      self.state = init_state(self.model, self.tx, self.mesh, cfg.seed, seq)
      self.train, self.eval = make_steps(cfg, self.model, self.tx, self.mesh, self.sh)


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# Perturbed like every param, but never moved (lr_mult 0): one through the
# matmul hook (a low-rank factor), one through the tree (the final norm).
STILL = r"decoder/layers/mlp/down_proj/b|final_norm/scale"


def _mezo_cfg(**zo_fields):
  """_cfg's model with a tied LM head and low-rank MLP weights (so the hook
  meets kernels, factors and a tied embedding), STILL at lr_mult 0."""
  c = _cfg(**zo_fields)
  c.model.update(tie_embeddings=True,
                 weight_forms=(dict(pattern=r".*/mlp/.*", form="low_rank", rank=8),))
  c.optim.groups = (dict(pattern=STILL, lr_mult=0.0), dict(pattern=r".*"))
  return c


@pytest.fixture(scope="module")
def mezo():
  """The MeZO run the model tests share (its step compiles once)."""
  return _OneDevice(_mezo_cfg())


def test_the_layerwise_perturbation_is_the_trees(mezo):
  """The loss at p + eps z with the matmul weights perturbed per layer in the
  hook (z of layer l from fold_in(key_P, l), generated inside the scan) equals
  the loss at the whole tree p + eps z with the same z, materialised: float32
  compute, same weights bit for bit, so only XLA's fusion of the sum into
  other ops may differ: rtol 1e-6 (~8 ulps). Also block-wise (block 1: the
  layer gate inside the scan). The hook covers exactly the Linear weights
  (kernels, low-rank factors); the tied embedding, which the lookup reads
  too, stays in the tree."""
  run, cfg = mezo, mezo.cfg
  batch, rng, params = _batch(cfg, 0), jax.random.key(0), mezo.state.params
  loss_fn = make_loss(run.model)
  leaves = zo.leaves_of(cfg, params)
  key = zo.query_keys(jax.random.key(5), "rbg")(0)  # The step's generator.
  eps, one = 1e-2, jnp.int32(1)

  found = []

  def losses(p):
    in_matmul = zo.matmul_leaves(loss_fn, p, batch, rng, leaves)
    found.append(sorted(in_matmul))  # Traced again here: not a cached trace's empty list.
    hook = lambda b: zo.perturbed_loss(loss_fn, p, batch, rng, key, eps, leaves, in_matmul, b)[0]
    tree = lambda b: loss_fn(zo.perturb(p, zo.directions(key, p, leaves, b), eps), batch, rng)[0]
    return hook(None), tree(None), hook(one), tree(one), loss_fn(p, batch, rng)[0]

  with run._ctx():  # pylint: disable=protected-access
    in_matmul = zo.matmul_leaves(loss_fn, params, batch, rng, leaves)
    hook, tree, hook_1, tree_1, at_p = map(float, jax.jit(losses)(params))
  weights = [l.path for l in leaves if re.search(r"/(kernel|a|b)$", l.path)]
  assert sorted(in_matmul) == found[0] == sorted(weights) and len(weights) == 10
  assert "embedding" not in in_matmul  # The tied head's operand.
  np.testing.assert_allclose([hook, hook_1], [tree, tree_1], rtol=1e-6)
  for h in (hook, hook_1):
    assert abs(h - at_p) > 1e-4, (h, at_p)  # The perturbation really moved the loss.
  assert abs(hook - hook_1) > 1e-4  # Block 1 alone is another perturbation.


def test_forward_gradient_of_the_model_is_grad_dot_z(mezo):
  """On the smoke model: the jvp of t -> L(p + t z) (z made per layer in the
  hook) vs jax.grad . z, both float32 over ~50k params in different
  summation orders: rtol 1e-3."""
  cfg = _mezo_cfg(estimator="forward")
  batch = _batch(cfg, 0)
  loss_fn = make_loss(mezo.model)
  params = mezo.state.params
  leaves = zo.leaves_of(cfg, params)
  qkey = zo.query_keys(jax.random.key(3), "rbg")
  with mezo._ctx():  # pylint: disable=protected-access
    gs, _, _ = jax.jit(lambda p: zo.estimate(cfg, loss_fn, p, batch, jax.random.key(0), qkey,
                                             leaves))(params)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch, jax.random.key(0))[0]))(params)
  zs = _directions(cfg, params, qkey(0))
  ref = sum(np.sum(np.asarray(g, np.float64) * np.asarray(z, np.float64))
            for g, z in zip(jax.tree.leaves(grads), zs))
  np.testing.assert_allclose(float(gs[0]), ref, rtol=1e-3)


def _directions(cfg, params, key, block=None):
  """zo.directions in one jit (eagerly, each leaf's layer loop compiles alone)."""
  leaves = zo.leaves_of(cfg, params)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
  return jax.jit(lambda k, b: zo.directions(k, shapes, leaves, b))(key, block)


def _reference(cfg, p0, g, zkey, lr_mult, block=None):
  """The update of the params p0 (float64 NumPy) from one projected gradient g
  and z regenerated from the step's ``zkey``."""
  zs = _directions(cfg, p0, zo.query_keys(zkey, "rbg")(0), block)
  g_hat = jax.tree.unflatten(jax.tree.structure(p0), [g * np.asarray(z, np.float64) for z in zs])
  lr, wd = cfg.optim.lr, cfg.optim.weight_decay
  paths = flax.traverse_util.flatten_dict(jax.tree.map(lambda _: True, p0), sep="/")
  unflat = lambda d: flax.traverse_util.unflatten_dict(d, sep="/")
  decay = unflat({k: not any(re.fullmatch(r, k) for r in cfg.optim.no_decay) for k in paths})
  mult = unflat({k: lr_mult(k) for k in paths})
  if cfg.optim.name == "adamw":
    tx = optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=wd, mask=decay)
    updates, _ = tx.update(g_hat, tx.init(p0), p0)
    return optax.apply_updates(p0, updates)
  step = np.sign if cfg.optim.sgd.sign else (lambda x: x)
  return jax.tree.map(lambda p, gz, d, k: p - k * lr * (step(gz) + wd * d * p),
                      p0, g_hat, decay, mult)


def _assert_close(params, ref):
  """float32 vs float64 on |p| ~ 1: atol 1e-6."""
  for a, b in zip(jax.tree.leaves(_np(params)), jax.tree.leaves(_np(ref))):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_mezo_step_matches_the_reference_and_restores(mezo):
  """One MeZO step's params vs float64 NumPy from the step's own g and z
  (regenerated): p - lr (g z + wd p), wd masked by no_decay, applied one
  layer at a time in place.

  It also restores bit-identically: the LM head (perturbed in the matmul
  hook) and the final norm (in the tree) have lr_mult 0, so after two
  perturbed forwards and an update of exactly zero they equal the params
  before, bit for bit. MeZO's in-place cycle p + eps z - 2 eps z + eps z
  (measured below) does not."""
  run, cfg = mezo, mezo.cfg
  assert zo.layerwise_update(cfg, run.state.opt_state)
  p0 = _np(run.state.params)
  state, m = run.step(run.copy(run.state), _batch(cfg, 0))
  assert m["finite"] == 1 and abs(m["zo/projected_grad"]) > 0
  _, zkey = jax.random.split(zo.step_key(run.state))
  still = lambda k: 0.0 if re.fullmatch(STILL, k) else 1.0
  _assert_close(state.params, _reference(cfg, p0, np.float64(m["zo/projected_grad"]), zkey, still))
  after = flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, state.params), sep="/")
  before = flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, run.state.params), sep="/")
  kept = [k for k in before if re.fullmatch(STILL, k)]
  assert len(kept) == 2
  for k in kept:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  zs = _directions(cfg, run.state.params, zo.query_keys(jax.random.key(0), "rbg")(0))
  p = zo.perturb(zo.perturb(zo.perturb(run.state.params, zs, 1e-3), zs, -2e-3), zs, 1e-3)
  changed = sum(int(np.sum(np.asarray(a) != b)) for a, b in zip(
      jax.tree.leaves(p), jax.tree.leaves(jax.tree.map(np.asarray, run.state.params))))
  assert changed > 0  # Rounding: why the step never modifies p in place.


@pytest.mark.parametrize("rule", ["sign", "adam", "blockwise"])
def test_update_rules_match_the_reference(mezo, rule):
  """The update alone (``_apply`` jitted without the forwards, whose
  estimate is MeZO's) for a given g, on the shared run's params: ZO-SGD-Sign
  p - lr (sign(g z) + wd p), one layer at a time; ZO-Adam = optax.adamw on
  g z, the whole-tree path; block-wise MeZO with block 0 and no weight decay:
  layer 0 of each stacked leaf moves, nothing else does (layer 1, the
  embedding)."""
  from qtrain.optim import build_optimizer  # pylint: disable=g-import-not-at-top
  from qtrain.train import abstract_params  # pylint: disable=g-import-not-at-top
  cfg = _mezo_cfg(blockwise=rule == "blockwise")
  cfg.optim.groups = (dict(pattern=r".*"),)
  cfg.optim.sgd.sign = rule == "sign"
  cfg.optim.name = "adamw" if rule == "adam" else "sgd"
  if rule == "blockwise":
    cfg.optim.weight_decay = 0.0
  run = mezo
  with run._ctx():  # pylint: disable=protected-access
    tx = build_optimizer(cfg, abstract_params(run.model, cfg.data.seq_len))
  state = run.state.replace(opt_state=tx.init(run.state.params))
  assert zo.layerwise_update(cfg, state.opt_state) == (rule != "adam")
  g, zkey = 0.7, jax.random.key(11)
  block = jnp.int32(0) if rule == "blockwise" else None
  leaves = zo.leaves_of(cfg, state.params)
  with run._ctx():  # pylint: disable=protected-access
    params, _, _ = jax.jit(lambda st: zo._apply(  # pylint: disable=protected-access
        cfg, st, jnp.asarray([g], jnp.float32), zo.query_keys(zkey, "rbg"), leaves, block,
        jnp.bool_(True), tx, None))(state)
  p0 = _np(state.params)
  _assert_close(params, _reference(cfg, p0, g, zkey, lambda k: 1.0, block))
  if rule == "blockwise":
    after = _np(params)
    q0, q1 = (t["decoder"]["layers"]["attn"]["q_proj"]["kernel"] for t in (p0, after))
    assert not np.array_equal(q0[0], q1[0]) and np.array_equal(q0[1:], q1[1:])
    np.testing.assert_array_equal(p0["embedding"], after["embedding"])


def test_zeroqat_moves_only_the_quantizer_steps():
  """configs/zo/zeroqat_w4a16.py's groups on the smoke model: learned weight
  steps move, every other param (the weights being quantized) stays bit-identical."""
  from configs.zo import zeroqat_w4a16  # pylint: disable=g-import-not-at-top
  cfg = zeroqat_w4a16.get_config("smoke")
  cfg.model.vocab_size = 128
  cfg.data.update(seq_len=16, global_batch_size=2)
  cfg.mesh.data = 1
  run = _OneDevice(cfg)
  before = flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, run.state.params), sep="/")
  state, m = run.step(run.copy(run.state), _batch(cfg, 0))
  after = flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, state.params), sep="/")
  steps = [k for k in before if k.endswith("weight_step")]
  assert m["finite"] == 1 and len(steps) == 7
  for k in before:
    if k in steps:
      assert not np.array_equal(after[k], before[k]), k
    else:
      np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_config_errors_name_the_field(mezo):
  cfg = _cfg()
  cfg.optim.grad_clip = 1.0
  with pytest.raises(ConfigError, match=r"config\.optim\.grad_clip=1\.0.*grad_clip=0"):
    validate(cfg, n_devices=1)
  cfg = _cfg("w4a16", estimator="forward")
  with pytest.raises(ConfigError, match=r"config\.zo\.estimator='forward'.*custom VJP"):
    validate(cfg, n_devices=1)
  cfg = _cfg(queries=0)
  with pytest.raises(ConfigError, match=r"config\.zo\.queries=0"):
    validate(cfg, n_devices=1)
  cfg = _cfg()
  cfg.optim.groups = (dict(pattern=r".*", optimizer="frozen"),)
  with pytest.raises(ConfigError, match=r"every param is in a frozen group"):
    zo.leaves_of(cfg, mezo.state.params)  # What the step calls first when traced.


def test_mezo_step_holds_no_gradient_or_optimizer_state(mezo):
  """Compiled memory on one device: MeZO's optimizer state is the schedule's
  counts (no param-sized buffer), and its temporaries exceed the forward
  pass's by less than two layers' worth of params (one layer's z and its
  perturbed weights; 4 layers here, 22% of the params each): the matmul
  weights are perturbed one layer at a time in the hook and the update writes
  one layer at a time into the donated params, so no perturbed copy, z, g_hat
  or update of the whole stack is live. Measured on CPU: + 0.26 x params
  (one layer: 0.22 x); the whole-tree perturbation before: + 1.6 x, a
  perturbed copy plus the generator's bits."""
  run = mezo
  params = sum(x.nbytes for x in jax.tree.leaves(run.state.params))
  layer = sum(x.nbytes for x in jax.tree.leaves(run.state.params["decoder"])) / run.cfg.model.n_layers
  opt = sum(x.nbytes for x in jax.tree.leaves(run.state.opt_state))
  assert opt < 64, opt  # The schedule's counts only.
  loss_fn = make_loss(run.model)
  batch = _batch(run.cfg, 0)
  with run._ctx():  # pylint: disable=protected-access
    fwd = jax.jit(lambda p, b: loss_fn(p, b, jax.random.key(0))[0]).lower(
        run.state.params, batch).compile().memory_analysis().temp_size_in_bytes
    step = run.train.lower(run.state, batch).compile().memory_analysis()
  extra = step.temp_size_in_bytes - fwd
  assert extra < 2 * layer, (extra / params, layer / params)


def test_kill_and_resume_replays_the_same_directions(mezo, tmp_path):
  """MeZO 4 steps straight vs 2 steps, an orbax save and restore (the state a
  killed run resumes from), 2 more: the directions come from step_key(state)
  (the state's rng and step), so the final params are bit-identical. The
  loop's own resume (data position, SIGKILL) is tests/test_train.py's."""
  from qtrain.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from qtrain.train.state import abstract_state  # pylint: disable=g-import-not-at-top
  run = mezo
  batches = [_batch(run.cfg, i) for i in range(4)]

  def steps(state, bs):
    for b in bs:
      state, _ = run.step(state, b)
    return state

  straight = steps(run.copy(run.state), batches)
  half = steps(run.copy(run.state), batches[:2])
  ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=1, async_save=False)
  ckpt.save(2, half, {})
  ckpt.wait()
  with run._ctx():  # pylint: disable=protected-access
    target = abstract_state(run.model, run.tx, run.mesh, run.cfg.data.seq_len)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        target, run.sh)
  restored, _ = ckpt.restore(2, target)
  ckpt.close()
  resumed = steps(restored, batches[2:])
  leaves = lambda s: jax.tree.leaves(jax.tree.map(np.asarray, s.params))
  for a, b in zip(leaves(straight), leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(leaves(straight), leaves(half)))

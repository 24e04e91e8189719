"""The compressed exchange on a ``data`` x ``fsdp`` mesh (8 fake CPU devices):
each replica's gradient stays split over ``fsdp`` and is compressed per shard
(qtrain/parallel/exchange.py, qtrain/train/compressed.py).

References: the ``first_order`` step on the same mesh (dense), the float64
mean of the replicas' contributions (PowerSGD at full rank, DGC sending
everything), the same exchange on ``data`` alone (PowerSGD at low rank:
splitting over fsdp must not change it), a float64 NumPy DGC run per fsdp
shard (the per-shard merge), the compiled HLO (what crosses ``data``), and an
uninterrupted run (resume).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import parallel_util as pu
from qtrain.config import ConfigError, base_config, validate
from qtrain.data.global_batch import to_global
from qtrain.parallel import exchange as ex_lib
from qtrain.train import abstract_state, make_steps, state_shardings

D, F = 4, 2  # data x fsdp.

# Leaves split over fsdp the ways the rules split params (``embed`` is the
# fsdp dim): rows (q/k/v, gate/up: [L, embed, out]), columns (down, the
# embedding: [.., embed] last), a column dim inside m (o_proj [L, heads, hd,
# embed]), a scanned batch dim (no rule does it; supported all the same), and
# one unsplit. name -> (shape, n_batch, fsdp spec).
LEAVES = {
    "rows": ((2, 16, 12), 1, P(None, "fsdp", None)),
    "cols": ((16, 12), 0, P(None, "fsdp")),
    "inner": ((2, 4, 6, 8), 1, P(None, None, None, "fsdp")),
    "batch": ((4, 8, 6), 1, P("fsdp", None, None)),
    "whole": ((8, 10), 0, P(None, None)),
}


def _ex(method, **groups):
  ex = base_config().exchange
  ex.method = method
  for name, values in groups.items():
    ex[name].update(values)
  return ex


def _mesh(data, fsdp):
  return jax.sharding.Mesh(np.array(jax.devices()[:data * fsdp]).reshape(data, fsdp),
                           (ex_lib.AXIS, ex_lib.FSDP))


def _exchange_fn(ex, states, mesh, sparsity=None):
  """jitted (contrib {name: [D, *shape]}, states) -> (estimate, states, bytes
  over data, bytes over fsdp): a shard_map manual over ``data`` (fsdp auto,
  the leaves split as LEAVES say), as the family calls the exchange."""
  d, f = mesh.shape[ex_lib.AXIS], mesh.shape[ex_lib.FSDP]
  specs = {k: (s if f > 1 else P()) for k, (_, _, s) in LEAVES.items()}
  outer = ex_lib.state_specs(states)

  def local(contrib, states):
    wire = ex_lib.Wire(d, f)
    est, new = ex_lib.exchange(jax.tree.map(lambda c: c[0], contrib), states, ex, wire,
                               sparsity=sparsity, specs=specs if f > 1 else None)
    return est, new, jnp.float32(wire.sent), jnp.float32(wire.sent_fsdp)

  body = jax.shard_map(local, mesh=mesh, axis_names={ex_lib.AXIS}, check_vma=False,
                       in_specs=(P(ex_lib.AXIS), outer), out_specs=(P(), outer, P(), P()))
  sh = lambda spec: NamedSharding(mesh, spec)
  contrib_sh = {k: sh(P(ex_lib.AXIS, *s)) for k, s in specs.items()}
  state_sh = jax.tree.map(
      lambda st, s: (ex_lib.DGC(sh(P(ex_lib.AXIS, *s)), sh(P(ex_lib.AXIS, *s)), st.n_batch)
                     if isinstance(st, ex_lib.DGC) else
                     ex_lib.PowerSGD(sh(P(ex_lib.AXIS, *s)), sh(P()))),
      states, specs, is_leaf=lambda x: isinstance(x, (ex_lib.DGC, ex_lib.PowerSGD)))
  return jax.jit(body, in_shardings=(contrib_sh, state_sh),
                 out_shardings=({k: sh(s) for k, s in specs.items()}, state_sh,
                                sh(P()), sh(P())))


def _contribs(seed):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=(D, *shape)).astype(np.float32)
          for k, (shape, _, _) in LEAVES.items()}


def _powersgd_states(rank=None, seed=0):
  """PowerSGD states of LEAVES (rank None: full rank min(n, m))."""
  rng, states = np.random.default_rng(seed), {}
  for k, (shape, n_batch, _) in LEAVES.items():
    _, n, m = ex_lib.matrix_dims(shape, n_batch)
    r = min(n, m) if rank is None else rank
    q = rng.normal(size=(*shape[:n_batch], m, r)).astype(np.float32)
    states[k] = ex_lib.PowerSGD(np.zeros((D, *shape), np.float32), q)
  return states


def _dgc_states():
  return {k: ex_lib.DGC(np.zeros((D, *shape), np.float32), np.zeros((D, *shape), np.float32),
                        n_batch=n_batch) for k, (shape, n_batch, _) in LEAVES.items()}


def test_powersgd_at_full_rank_is_the_mean_on_data_x_fsdp():
  c = _contribs(1)
  states = _powersgd_states()
  est, new, sent, sent_fsdp = _exchange_fn(_ex("powersgd"), states, _mesh(D, F))(c, states)
  for k in LEAVES:
    mean = c[k].astype(np.float64).mean(0)
    # f32 QR and two f32 matmuls on O(1) entries: ~1e-6 relative; 1e-5 leaves margin.
    np.testing.assert_allclose(np.asarray(est[k]), mean, rtol=0,
                               atol=1e-5 * np.abs(mean).max(), err_msg=k)
    assert np.abs(np.asarray(new[k].error).mean(0)).max() < 1e-5, k
  # Bytes over data, per device, from the shard's own P and Q (f32, ring all-reduce):
  # rows split: P [B, n/F, r], Q [B, m, r]; columns or batch split: P [B, n, r] of
  # the shard's matrices, Q [B, m/F, r]; unsplit: both whole.
  elems = {"rows": 2 * (8 * 12 + 12 * 12), "cols": 16 * 12 + 6 * 12,
           "inner": 2 * (4 * 4 + 24 * 4), "batch": 2 * (8 * 6 + 6 * 6), "whole": 8 * 8 + 10 * 8}
  assert float(sent) == pytest.approx(2 * (D - 1) / D * 4 * sum(elems.values()))
  assert float(sent_fsdp) > 0  # P's gather, the partial sums, Q's gather.


def test_powersgd_split_over_fsdp_equals_it_on_data_alone():
  """Rank 2 over three steps (warm-started Q, error feedback): splitting the
  gradient over fsdp changes only the float32 summation order."""
  ex = _ex("powersgd", powersgd={"rank": 2})
  split = _exchange_fn(ex, _powersgd_states(2), _mesh(D, F))
  whole = _exchange_fn(ex, _powersgd_states(2), _mesh(D, 1))
  s_split = s_whole = _powersgd_states(2)
  for step in range(3):
    c = _contribs(10 + step)
    e_split, s_split, _, _ = split(c, s_split)
    e_whole, s_whole, _, _ = whole(c, s_whole)
    for k in LEAVES:
      # O(1) values through QR and three float32 matmuls, errors fed back: the
      # gap grows 3e-7, 2e-6, 4e-6 over the steps; 2e-5 leaves 4x.
      np.testing.assert_allclose(np.asarray(e_split[k]), np.asarray(e_whole[k]), rtol=0,
                                 atol=2e-5, err_msg=k)
      np.testing.assert_allclose(np.asarray(s_split[k].q), np.asarray(s_whole[k].q), rtol=0,
                                 atol=2e-5, err_msg=k)
      np.testing.assert_allclose(np.asarray(s_split[k].error), np.asarray(s_whole[k].error),
                                 rtol=0, atol=2e-5, err_msg=k)


def _split(spec) -> int | None:
  """The dim ``spec`` puts on fsdp."""
  return next((i for i, a in enumerate(spec) if a == ex_lib.FSDP), None)


def _shards(x, n_batch, spec):
  """[D, *shape] -> list over fsdp shards of [D, batch, n m] (shard-flattened)."""
  split = _split(spec)
  blocks = [x] if split is None else np.split(x, F, axis=1 + split)
  return [b.reshape(D, *ex_lib.matrix_dims(b.shape[1:], n_batch)[:1], -1) for b in blocks]


def _unshard(blocks, shape, spec):
  split = _split(spec)
  if split is None:
    return blocks[0].reshape(shape)
  local = list(shape)
  local[split] //= F
  return np.concatenate([b.reshape(local) for b in blocks], axis=split)


def _numpy_dgc(c, u, v, sparsity, momentum):
  """float64 DGC of Lin et al. on [D, batch, N] (momentum correction,
  accumulation, top-k per row of N, factor masking): (mean, u, v)."""
  k = max(1, round(c.shape[-1] * (1 - sparsity)))
  u = momentum * u + c
  v = v + u
  est = np.zeros(c.shape[1:])
  for r in range(c.shape[0]):
    for b in range(c.shape[1]):
      top = np.argsort(-np.abs(v[r, b]))[:k]
      est[b, top] += v[r, b, top]
      u[r, b, top] = 0.0
      v[r, b, top] = 0.0
  return est / c.shape[0], u, v


def _local_shape(shape, spec):
  split = _split(spec)
  return tuple(n // F if i == split else n for i, n in enumerate(shape))


def test_dgc_is_a_top_k_per_fsdp_shard():
  """Three steps at 90% with momentum 0.9 against a float64 DGC run on each
  fsdp shard as its own matrix (k = round(shard size x 0.1))."""
  sparsity, momentum = 0.9, 0.9
  ex = _ex("dgc", dgc={"momentum": momentum})
  states = _dgc_states()
  step = _exchange_fn(ex, states, _mesh(D, F), sparsity=sparsity)
  ref = {k: [(np.zeros(b.shape), np.zeros(b.shape))
             for b in _shards(np.zeros((D, *shape)), n_batch, spec)]
         for k, (shape, n_batch, spec) in LEAVES.items()}
  for t in range(3):
    c = _contribs(20 + t)
    est, states, sent, _ = step(c, states)
    for k, (shape, n_batch, spec) in LEAVES.items():
      outs = [_numpy_dgc(b.astype(np.float64), u, v, sparsity, momentum)
              for b, (u, v) in zip(_shards(c[k], n_batch, spec), ref[k])]
      ref[k] = [(u, v) for _, u, v in outs]
      # float32 accumulation of O(1) values over 3 steps: 1e-5 absolute.
      want = _unshard([e for e, _, _ in outs], shape, spec)
      np.testing.assert_allclose(np.asarray(est[k]), want, atol=1e-5, err_msg=k)
      for name, got, i in (("momentum", states[k].momentum, 0), ("residual", states[k].residual, 1)):
        for j, (b, r) in enumerate(zip(_shards(np.asarray(got), n_batch, spec), ref[k])):
          np.testing.assert_allclose(b, r[i], atol=1e-5, err_msg=f"{k} {name} shard {j}")
  # Per device: k f32 values + k s32 indices of each matrix of its own shard,
  # all-gathered over data: (D-1) x 8 bytes x k x matrices.
  expected = 0
  for shape, n_batch, spec in LEAVES.values():
    local = _local_shape(shape, spec)
    k = max(1, round(int(np.prod(local[n_batch:])) * (1 - sparsity)))
    expected += (D - 1) * 8 * k * int(np.prod(local[:n_batch]))
  assert float(sent) == expected


@pytest.mark.parametrize("clip", [0.0, 10.0])
def test_dgc_sending_everything_is_the_mean_on_data_x_fsdp(clip):
  """Sparsity 0 (k = every entry of the shard), with and without DGC's local
  clipping, whose norm is the replica's whole gradient, not its shard's."""
  c = _contribs(30)
  states = _dgc_states()
  ex = _ex("dgc", dgc={"clip": clip})
  est, new, _, _ = _exchange_fn(ex, states, _mesh(D, F), sparsity=0.0)(c, states)
  norms = np.sqrt(sum((c[k].astype(np.float64).reshape(D, -1) ** 2).sum(1) for k in LEAVES))
  scale = np.minimum(1.0, clip / np.sqrt(D) / norms) if clip else np.ones(D)
  assert clip == 0 or scale.max() < 0.5  # The clip is in play (norms ~ 35 vs 10 / sqrt(D) = 5).
  for k in LEAVES:
    mean = (c[k].astype(np.float64) * scale.reshape(-1, *[1] * (c[k].ndim - 1))).mean(0)
    # A sum of 4 float32 values, /4 (and the scale's float32 rounding).
    np.testing.assert_allclose(np.asarray(est[k]), mean, rtol=0, atol=1e-6, err_msg=k)
    assert not np.asarray(new[k].residual).any()


# ------------------------------------------------------- the step family --


def _family(method, data=D, fsdp=F, **exchange):
  """(run, state shardings) of the compressed family (data=4 x fsdp=2)."""
  cfg = pu.smoke_config(data=data, fsdp=fsdp)
  cfg.optim.adamw.eps = _EPS
  cfg.train.step = "compressed"
  cfg.exchange.method = method
  cfg.exchange.min_size = 256
  for name, values in exchange.items():
    cfg.exchange[name].update(values)
  run = pu.Run(cfg)
  with run.layout:
    return run, state_shardings(run.model, run.tx, run.mesh, pu.SEQ)


@pytest.fixture(scope="module")
def state0():
  """The smoke model's initial TrainState (numpy), from one device: every
  mesh starts from the same numbers."""
  one = pu.smoke_config()
  one.optim.adamw.eps = _EPS
  return pu.Run(one).init_state()


def _init(run, sh, state0):
  """``state0`` on ``run``'s mesh with the compressor state of a fresh run
  (run eagerly on the host), so no init is compiled per mesh."""
  opt = run.tx.init(state0.params)
  assert isinstance(opt, ex_lib.ExchangeState)
  opt = ex_lib.ExchangeState(state0.opt_state, opt.exchange)  # Same AdamW init.
  return jax.device_put(state0.replace(opt_state=opt), sh)


def _masked_batch():
  """Rows scoring 1..T tokens: replicas (and fsdp shards) hold unequal shares."""
  b = pu.batch(0)
  lengths = np.linspace(1, pu.SEQ, pu.BATCH).astype(int)
  b["loss_mask"] = (np.arange(pu.SEQ)[None, :] < lengths[:, None]).astype(np.int32)
  return b


# Adam's first update is lr g / (|g| + eps): with eps 1e-8 an entry within a few
# eps of zero turns float32 reordering into a visible change; eps 1e-3 keeps the
# comparison well conditioned (every side shares it).
_EPS = 1e-3


def test_dense_on_data_x_fsdp_equals_first_order(state0):
  """The ``first_order`` step on the same mesh; that one equals the step on one
  device (tests/test_parallel.py::test_adamw_step_equals_single_device, on
  data x fsdp x tensor), which a third compile here would only repeat."""
  cfg = pu.smoke_config(data=D, fsdp=F)
  cfg.optim.adamw.eps = _EPS
  refs = {"first_order data x fsdp": pu.Run(cfg).train_step(state0, _masked_batch())}
  run, sh = _family("dense")
  state = _init(run, sh, state0)
  with run.layout:
    train, _ = make_steps(run.cfg, run.model, run.tx, run.mesh, sh)
    state, m = train(state, to_global(_masked_batch(), run.mesh))
  m = {k: float(v) for k, v in m.items()}
  for name, (params, metrics) in refs.items():
    # The global token-mean gradient up to float32 reordering; one AdamW step
    # of lr 3e-3 moves params by <= 3e-3, 1e-6 is 0.03% of it.
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True):
      np.testing.assert_allclose(np.asarray(b), a, rtol=0, atol=1e-6, err_msg=name)
    for k in ("loss", "objective", "tokens"):
      assert m[k] == pytest.approx(metrics[k], rel=1e-6), (name, k)
    assert m["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=1e-5), name
  # Each device all-reduces its own fsdp shard over data: half the gradient.
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  assert m["exchange/bytes_sent"] == m["exchange/bytes_dense"] == pytest.approx(
      2 * (D - 1) / D * 4 * _sharded_elems(sh.params, state.params))
  assert _sharded_elems(sh.params, state.params) < n_params
  assert m["exchange/bytes_fsdp"] == 0.0


def test_powersgd_step_on_data_x_fsdp_equals_it_on_data_alone(state0):
  """PowerSGD rank 2 in the family on data=2 x fsdp=2 and on data=2: every
  real split (q/k/v and gate/up by rows, down and the embedding by columns,
  o_proj inside m, the LM head by rows) gives the data-only exchange."""
  out = {}
  for fsdp in (F, 1):
    run, sh = _family("powersgd", data=2, fsdp=fsdp, powersgd={"rank": 2})
    with run.layout:
      train, _ = make_steps(run.cfg, run.model, run.tx, run.mesh, sh)
      state, m = train(_init(run, sh, state0), to_global(_masked_batch(), run.mesh))
    out[fsdp] = jax.tree.map(np.asarray, state.params), {k: float(v) for k, v in m.items()}
  (split, m_split), (whole, m_whole) = out[F], out[1]
  assert m_split["exchange/ratio"] > 2  # Compressed: rank-2 factors of the matrices.
  assert m_split["exchange/bytes_fsdp"] > 0
  # Same update up to float32 reordering: 1e-6 of a 3e-3 AdamW step (as above).
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(split), strict=True):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
  assert m_split["grad_norm"] == pytest.approx(m_whole["grad_norm"], rel=1e-5)


def _sharded_elems(shardings, params) -> int:
  """Elements of the params one device holds (each split over fsdp or whole)."""
  return sum(int(np.prod(s.shard_shape(x.shape)))
             for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(params)))


# ------------------------------------------------------------ HLO groups --


def _iota(dims, perm, shape):
  ids = np.arange(int(np.prod(dims))).reshape(dims)
  return (ids.transpose(perm) if perm else ids).reshape(shape)


def _groups(line: str) -> list[list[int]]:
  """The device groups of a collective's ``replica_groups`` (explicit, iota,
  or mesh form)."""
  m = re.search(r"replica_groups=\{(\{[\d,{}]*\})\}", line)
  if m:
    return [[int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
  m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  if m:
    shape, dims = [[int(i) for i in x.split(",")] for x in m.groups()[:2]]
    perm = [int(i) for i in m.group(3).split(",")] if m.group(3) else None
    return _iota(dims, perm, shape).tolist()
  m = re.search(r"replica_groups=mesh\[([^\]]*)\], device_ids=\(\[([\d,]+)\]"
                r"(?:T\(([\d,]+)\))?\) \{([^}]*)\}", line)
  if m:
    axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    dims = [int(i) for i in m.group(2).split(",")]
    perm = [int(i) for i in m.group(3).split(",")] if m.group(3) else None
    ids = _iota(dims, perm, sizes)
    over = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(4))]
    rest = [i for i in range(len(names)) if i not in over]
    return ids.transpose(rest + over).reshape(-1, int(np.prod([sizes[i] for i in over]))).tolist()
  raise AssertionError(f"unparsed replica_groups: {line[:300]}")


_COLLECTIVE = re.compile(r"=\s+(\(.*?\)|\S+)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\(")


def _over_data(text, mesh) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
  """{op: [(dtype, dims) of each array]} of the collectives whose device
  groups span more than one data index."""
  data_of = {d.id: i for i, row in enumerate(mesh.devices) for d in row.ravel()}
  out: dict[str, list] = {}
  for line in text.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    if any(len({data_of[i] for i in g}) > 1 for g in _groups(line)):
      shapes = [(dt, tuple(int(d) for d in dims.split(",") if d))
                for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1))]
      out.setdefault(m.group(2), []).extend(shapes)
  return out


DGC_WARMUP = dict(sparsity=0.99, warmup_steps=2, warmup_sparsity=(0.75, 0.9), momentum=0.9)


@pytest.fixture(scope="module")
def dgc_step(state0):
  """(run, shardings, the compiled DGC step with a 3-stage warm-up, its
  initial state as a function)."""
  run, sh = _family("dgc", dgc=DGC_WARMUP)
  host = jax.tree.map(np.asarray, _init(run, sh, state0))
  fresh = lambda: jax.device_put(host, sh)  # The step donates its state: a new copy each.
  with run.layout:
    train, _ = make_steps(run.cfg, run.model, run.tx, run.mesh, sh)
    compiled = train.lower(fresh(), to_global(pu.batch(0), run.mesh)).compile()
  return run, sh, compiled, fresh


def test_dgc_sends_only_k_per_shard_over_data(dgc_step):
  run, sh, compiled, _ = dgc_step
  over = _over_data(compiled.as_text(), run.mesh)
  # Each compressed matrix's fsdp shard sends round(shard size (1 - s)) f32
  # values and s32 indices per stage, gathered over the D replicas.
  with run.layout:
    params = abstract_state(run.model, run.tx, run.mesh, pu.SEQ).params
  expected = set()
  for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(sh.params)):
    if x.size >= 256 and x.ndim >= 2:
      local = s.shard_shape(x.shape)
      batch = local[0] if x.ndim == 3 else 1
      for sparsity in (0.75, 0.9, 0.99):
        k = max(1, round(int(np.prod(local)) // batch * (1 - sparsity)))
        expected |= {("f32", (D, batch, k)), ("s32", (D, batch, k))}
  assert set(over["all-gather"]) == expected, sorted(set(over["all-gather"]))
  # Nothing gradient-sized crosses data: all-reduces only of the dense small
  # leaves (norm scales, <= 128 elements) and scalars; no other collective.
  assert max(int(np.prod(d)) for _, d in over["all-reduce"]) < 256, over["all-reduce"]
  assert set(over) == {"all-gather", "all-reduce"}, set(over)






def test_resume_is_bit_identical_with_the_state_over_data_x_fsdp(dgc_step, tmp_path):
  run, sh, compiled, fresh = dgc_step
  straight, metrics = pu.run_steps(run, compiled, fresh(), range(4))
  assert [m["exchange/sparsity"] for m in metrics] == pytest.approx([0.75, 0.9, 0.99, 0.99])
  first, _ = pu.run_steps(run, compiled, fresh(), range(2))
  restored = pu.save_restore(run, run.tx, sh, first, tmp_path / "ckpt", 2)
  resumed, _ = pu.run_steps(run, compiled, restored, range(2, 4))
  exchange = straight.opt_state.exchange
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(exchange))  # In play.
  leaves = lambda s: jax.tree.leaves(jax.tree.map(np.asarray, s))
  for a, b in zip(leaves(straight), leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  # A device holds its replica's slice of its fsdp shard: q_proj's residual
  # [D, L, d, heads x hd] is split over data and, on d, over fsdp.
  v = exchange["decoder"]["layers"]["attn"]["q_proj"]["kernel"].residual
  assert v.sharding.spec[:3] == ("data", None, "fsdp")
  assert v.addressable_shards[0].data.shape == (1, v.shape[1], v.shape[2] // F, v.shape[3])


# ----------------------------------------------------------- the config --


@pytest.mark.parametrize("axis", ["tensor", "sequence"])
def test_other_axes_are_refused(axis):
  cfg = pu.smoke_config(data=2, fsdp=2, **{axis: 2})
  cfg.train.step = "compressed"
  cfg.exchange.method = "dgc"
  with pytest.raises(ConfigError, match=rf"config.train.step='compressed' runs on a data x "
                     rf"fsdp mesh only: config.mesh.{axis}=2 must be 1"):
    validate(cfg, n_devices=8)
  cfg.mesh[axis] = 1
  validate(cfg, n_devices=4)  # data x fsdp passes.

"""Helpers of tests/test_parallel.py: the smoke model's loss, gradients and
one train step on a chosen mesh, and a small parser of compiled HLO text.

Every layout starts from the same numbers: the state is initialised once on
one device and placed onto each mesh with its shardings, and the batch takes
the loop's door (``to_global``), so the comparisons see only what the layout
changes.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np

from configs import default
from qtrain.config import validate
from qtrain.data.global_batch import to_global
from qtrain.optim import build_optimizer
from qtrain.parallel import AXES, Layout, replicated
from qtrain.train import (abstract_params, abstract_state, init_state, make_loss, make_steps,
                          state_shardings)
from qtrain.train.checkpoint import Checkpointer
from qtrain.train.build import build_model

# The smoke model (2 layers, d 64, 4 heads, 2 kv heads, ffn 160) with a
# 512-token vocabulary (the smoke config's 8192 only makes each compile slower).
VOCAB, SEQ, BATCH = 512, 32, 8


def smoke_config(quant: str = "", **mesh):
  """configs/default.py:smoke[,<quant>] on ``mesh`` (axis sizes; the rest 1)."""
  cfg = default.get_config(",".join(filter(None, ("smoke", quant))))
  cfg.model.vocab_size = VOCAB
  cfg.data.update(seq_len=SEQ, global_batch_size=BATCH, eval_batch_size=BATCH)
  cfg.optim.warmup_steps = 0  # The first step moves the params by the full lr.
  cfg.mesh.update({a: mesh.get(a, 1) for a in AXES})
  return cfg


def batch(seed: int = 0) -> dict:
  tokens = np.random.default_rng(seed).integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


@dataclasses.dataclass
class Run:
  """A model, its optimizer and shardings on the mesh of ``cfg.mesh``."""
  cfg: object

  def __post_init__(self):
    n = int(np.prod([self.cfg.mesh[a] for a in AXES]))
    validate(self.cfg, n_devices=n)
    self.model = build_model(self.cfg)
    self.layout = Layout.from_config(self.cfg, jax.devices()[:n])
    self.mesh = self.layout.mesh
    with self.layout:
      self.tx = build_optimizer(self.cfg, abstract_params(self.model, SEQ))
      self.state_sh = state_shardings(self.model, self.tx, self.mesh, SEQ)

  def init_state(self):
    """The initial TrainState as numpy (meant for a 1-device Run)."""
    with self.layout:
      return jax.tree.map(np.asarray, init_state(self.model, self.tx, self.mesh, 0, SEQ))

  def loss_and_grads(self, params, host_batch):
    """(loss, grads as numpy, compiled HLO text) of ``value_and_grad`` of the
    training loss, the gradients leaving sharded like the params (as they
    do inside the train step, where the optimizer update consumes them)."""
    loss_fn = make_loss(self.model)
    f = lambda p, b: loss_fn(p, b, jax.random.key(0))[0]
    with self.layout:
      step = jax.jit(jax.value_and_grad(f), out_shardings=(replicated(self.mesh),
                                                           self.state_sh.params))
      args = jax.device_put(params, self.state_sh.params), to_global(host_batch, self.mesh)
      compiled = step.lower(*args).compile()
      loss, grads = compiled(*args)
    return float(loss), jax.tree.map(np.asarray, grads), compiled.as_text()

  def train_step(self, state, host_batch):
    """(new params as numpy, metrics) of one step of ``make_steps``' train step."""
    with self.layout:
      train, _ = make_steps(self.cfg, self.model, self.tx, self.mesh, self.state_sh)
      new, metrics = train(jax.device_put(state, self.state_sh),
                           to_global(host_batch, self.mesh))
    return jax.tree.map(np.asarray, new.params), {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------- HLO text --


@dataclasses.dataclass(frozen=True)
class Instr:
  """One HLO instruction: ``name = type op(operands), attributes``."""
  name: str
  op: str
  shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) of each result array.
  callees: tuple[tuple[str, str], ...]  # (attribute, computation): body=, calls=, to_apply=...


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(body|condition|calls|to_apply)=%?([\w.\-]+)")


def _split_type(rest: str) -> tuple[str, str]:
  """'(f32[2]{0}, s32[]) op(...)' -> ('(f32[2]{0}, s32[])', 'op(...)')."""
  if not rest.startswith("("):
    type_str, _, tail = rest.partition(" ")
    return type_str, tail
  depth = 0
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return rest[:i + 1], rest[i + 1:].lstrip()
  raise ValueError(f"unbalanced tuple type in {rest[:80]!r}")


def parse_hlo(text: str) -> dict[str, list[Instr]]:
  """{computation name: its instructions} of a compiled module's text."""
  module, current = {}, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = module.setdefault(header.group(1), [])
      continue
    if line.startswith("}"):
      current = None
      continue
    m = _INSTR.match(line)
    if current is None or not m:
      continue
    type_str, tail = _split_type(m.group(2))
    op = tail.partition("(")[0]
    shapes = tuple((dt, tuple(int(d) for d in dims.split(",") if d))
                   for dt, dims in _ARRAY.findall(type_str))
    current.append(Instr(m.group(1), op, shapes, tuple(_CALLEE.findall(tail))))
  return module


def reachable(module, roots) -> set[str]:
  """The computations ``roots`` run, directly or through the ones they call."""
  seen, todo = set(), list(roots)
  while todo:
    name = todo.pop()
    if name in seen or name not in module:
      continue
    seen.add(name)
    todo.extend(c for ins in module[name] for _, c in ins.callees)
  return seen


def while_loops(module) -> list[tuple[Instr, set[str]]]:
  """[(a while instruction, the computations its body runs)]."""
  return [(ins, reachable(module, [dict(ins.callees)["body"]]))
          for instrs in module.values() for ins in instrs if ins.op == "while"]


def instructions(module, op: str, computations=None) -> list[Instr]:
  """Instructions named ``op`` in ``computations`` (default: all)."""
  names = module if computations is None else computations
  return [ins for n in names for ins in module.get(n, ()) if ins.op == op]


def same_dims(a, b) -> bool:
  """Equal up to the order of dims (XLA may gather a transposed copy)."""
  return sorted(a) == sorted(b)


def save_restore(run, tx, shardings, state, workdir, step: int):
  """``state`` through an orbax save and a restore onto ``shardings`` (the
  resume path of the loop, without the loop)."""
  ckpt = Checkpointer(str(workdir), keep=2, async_save=False)
  ckpt.save(step, state, {})
  ckpt.wait()
  with run.layout:
    target = abstract_state(run.model, tx, run.mesh, SEQ)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        target, shardings)
  restored, _ = ckpt.restore(step, target)
  ckpt.close()
  return restored


def run_steps(run, compiled, state, batches):
  """(state after ``compiled`` on ``batch(i)`` for i in ``batches``, each step's
  metrics as floats)."""
  metrics = []
  for i in batches:
    state, m = compiled(state, to_global(batch(i), run.mesh))
    metrics.append({k: float(v) for k, v in m.items()})
  return state, metrics


def assert_matches_one_device(loss, grads, ref_loss, ref_grads):
  """A sharded (loss, grads) equals one device's within float32 reordering:
  sums over BATCH x SEQ tokens (and over shards) regrouped, so each may move
  by n*u of its largest element (tests/test_parallel.py's bound)."""
  reorder = BATCH * SEQ * 2.0 ** -24
  assert abs(loss - ref_loss) <= reorder * abs(ref_loss), (loss, ref_loss)
  for (path, g), (_, w) in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                               jax.tree_util.tree_flatten_with_path(ref_grads)[0]):
    assert np.abs(g - w).max() <= reorder * np.abs(w).max(), jax.tree_util.keystr(path)


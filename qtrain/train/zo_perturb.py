"""The zeroth-order step's direction z, and the loss at p + s z without a
second copy of the params (MeZO, Malladi et al. 2023: fine-tuning in the
memory of inference).

What z is. Per perturbed param leaf at path P (``decoder/layers/attn/q_proj/kernel``),
z ~ N(0, I) in float32 from key_P = fold_in(qkey, crc32(P)). A leaf stacked
over the scanned layers (``decoder/layers/...``, [L, ...]) draws each layer's
slice alone, z[l] from fold_in(key_P, l), so layer l's z can be generated
where layer l runs, inside the decoder's scan, and again layer by layer in the
update. Every use (p + eps z, p - eps z, the jvp's tangent, the update)
regenerates z from these keys; z is never stored.

Where p + s z is formed:

* in the matmul hook, for a Linear's weight operand (a ``kernel``, low-rank
  ``a``/``b``; [in, out], or [L, in, out] sliced by the scan): ``Perturbation``
  adds s z to the weight right before its dot, so at most one layer's
  perturbed weights and its z exist at a time. It is scoped to one trace of
  the loss (``qtrain.layers.hooks.scoped_providers``) and outermost, so a
  quantizer sees the perturbed weight. The sum is formed in the dot's input
  dtype (the compute dtype): with float32 compute it is the tree's
  p + s z bit for bit; with bf16 compute it is bf16(bf16(p) + s z) rather
  than bf16(p + s z), one more rounding of p, the same at +eps and -eps.
* in the tree, materialised, for every other perturbed leaf: the embedding
  (the lookup and a tied LM head both read it), norm gains, quantizer steps,
  SLTrain's sparse values (scattered into a dense S before their dot). These
  are a small share of a Llama's params (the embedding of llama_1b: 6%).

Which leaves the hook covers is found by tracing the loss once under a
recording provider (``matmul_leaves``): nothing is kept by hand, and a leaf the
hook does not reach is perturbed in the tree, never skipped.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from qtrain.config.validate import ConfigError
from qtrain.layers.hooks import Provider, scoped_providers
from qtrain.optim.groups import assign_groups, param_path, parse_groups

_UNSCANNED_LAYER = re.compile(r"decoder/layers_(\d+)/.*")
_SCANNED = "decoder/layers/"  # Leaves stacked on axis 0 over the layers (nn.scan).


@dataclasses.dataclass(frozen=True)
class Leaf:
  """How the step treats one param leaf (tree-flatten order)."""
  path: str
  perturbed: bool  # False: a frozen group's param, never perturbed nor moved.
  block: int  # Block-wise: its block, or -1 for a leaf stacked over all layers.

  @property
  def stacked(self) -> bool:
    return self.block < 0


def leaves_of(cfg, params) -> list[Leaf]:
  """Per leaf of ``params``: path, whether it is perturbed, its block."""
  paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  try:
    groups = parse_groups(cfg.optim)
    index, _ = assign_groups(groups, paths)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  out = []
  for path in paths:
    m = _UNSCANNED_LAYER.fullmatch(path)
    block = -1 if path.startswith(_SCANNED) else int(m.group(1)) if m else cfg.model.n_layers
    out.append(Leaf(path, groups[index[path]].optimizer != "frozen", block))
  if not any(l.perturbed for l in out):
    raise ConfigError("config.optim.groups: every param is in a frozen group, so the "
                      "zeroth-order step has nothing to perturb; give some group an optimizer")
  return out


def direction(qkey, path: str, shape, layer=None):
  """z of the leaf at ``path`` (float32, ``shape``); with ``layer`` (an int or
  a traced int) the slice of a stacked leaf at that layer (``shape`` without
  the layer axis)."""
  key = jax.random.fold_in(qkey, zlib.crc32(path.encode()))
  if layer is not None:
    key = jax.random.fold_in(key, layer)
  return jax.random.normal(key, shape, jnp.float32)


def gate(block, leaf: Leaf, layer=None):
  """Block-wise: 1 where (the layer of) ``leaf`` is in ``block``, else 0 (float32)."""
  if block is None:
    return jnp.float32(1)
  return ((layer if leaf.stacked else leaf.block) == block).astype(jnp.float32)


def leaf_direction(qkey, leaf: Leaf, shape, block=None):
  """The whole leaf's z (zero outside ``block``). A stacked leaf's layers are
  drawn one at a time (``lax.map``, not ``vmap``: a batched RngBitGenerator
  draws other bits than the per-layer calls of the scan and the update)."""
  if not leaf.stacked:
    return direction(qkey, leaf.path, shape) * gate(block, leaf)
  return jax.lax.map(lambda l: direction(qkey, leaf.path, shape[1:], l) * gate(block, leaf, l),
                     jnp.arange(shape[0]))


def directions(key, params, leaves: list[Leaf], block=None):
  """z per perturbed leaf of ``params`` (None for the others) from ``key``;
  with ``block`` (a traced int) zero outside that block."""
  return [leaf_direction(key, leaf, p.shape, block) if leaf.perturbed else None
          for leaf, p in zip(leaves, jax.tree.leaves(params))]


def perturb(params, zs, scale):
  """params + scale * z on the leaves with a z (float32 sum, cast back)."""
  flat, treedef = jax.tree.flatten(params)
  new = [p if z is None else (p.astype(jnp.float32) + scale * z).astype(p.dtype)
         for p, z in zip(flat, zs)]
  return jax.tree.unflatten(treedef, new)


@dataclasses.dataclass(frozen=True, eq=False)
class Perturbation(Provider):
  """Adds ``scale`` * z to the weight operand of every matmul whose param is
  in ``leaves``, right before the dot (per layer under the scan)."""
  qkey: Any
  scale: Any  # eps, -eps, or the jvp's primal t (a traced scalar).
  leaves: Mapping[str, Leaf]  # Path -> leaf, the weight operands this hook perturbs.
  block: Any = None  # Block-wise: the perturbed block (traced int), else None.

  def lhs_grad_passes(self, site, hooks) -> bool:
    return True  # Moves the weight operand only.

  def dot(self, site, hooks, inner):
    leaf = self.leaves.get("/".join(site.param))
    if leaf is None:
      return inner
    layer = hooks.layer if site.stacked else None

    def fn(module, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
      s = self.scale * gate(self.block, leaf, layer)
      z = direction(self.qkey, leaf.path, rhs.shape, layer)
      rhs = (rhs.astype(jnp.float32) + s * z).astype(rhs.dtype)
      return inner(module, lhs, rhs, dimension_numbers, precision, preferred_element_type)

    return fn


class _Recorder(Provider):
  """Records every matmul site traced (``matmul_leaves``)."""

  def __init__(self):
    self.sites = []

  def dot(self, site, hooks, inner):
    self.sites.append(site)
    return inner


def matmul_leaves(loss_fn, params, batch, rng, leaves: list[Leaf]) -> dict[str, Leaf]:
  """Path -> leaf of the perturbed leaves that are a matmul's weight operand
  as stored ([in, out], stacked [L, in, out]) and read by no other op, from
  one abstract trace of ``loss_fn``. The tied LM head's operand (weight axis
  1) is the embedding, which the lookup also reads: it stays in the tree."""
  rec = _Recorder()
  with scoped_providers(rec):
    # A fresh function: eval_shape caches traces by function, and a cached
    # trace would record nothing.
    jax.eval_shape(lambda *args: loss_fn(*args), params, batch, rng)
  shapes = {l.path: p.shape for l, p in zip(leaves, jax.tree.leaves(params))}
  by_path = {l.path: l for l in leaves if l.perturbed}
  shared = {"/".join(s.param) for s in rec.sites if s.weight_axis != 0}
  out = {}
  for s in rec.sites:
    path = "/".join(s.param)
    want = (s.in_features, s.out_features)
    if path not in by_path or path in shared:
      continue
    if shapes[path] == ((shapes[path][0], *want) if s.stacked else want):
      out[path] = by_path[path]
  return out


def perturbed_loss(loss_fn, params, batch, rng, qkey, scale, leaves: list[Leaf],
                   in_matmul: Mapping[str, Leaf], block=None):
  """``loss_fn`` at p + scale * z: the leaves of ``in_matmul`` in the matmul
  hook, layer by layer; the other perturbed leaves in the tree."""
  rest = [dataclasses.replace(l, perturbed=l.perturbed and l.path not in in_matmul)
          for l in leaves]
  p = perturb(params, directions(qkey, params, rest, block), scale)
  with scoped_providers(Perturbation(qkey, scale, in_matmul, block)):
    return loss_fn(p, batch, rng)

"""Muon for the model's matrices, registered as ``muon``; the OSP partition.

Muon (Jordan 2024; Liu et al. 2025, "Muon is Scalable for LLM Training",
arXiv 2502.16982) orthogonalises each matrix's Nesterov momentum with five
Newton-Schulz steps and scales the result by ``rms_scale * sqrt(max(A, B))``
for an A x B matrix, so its update RMS is ``rms_scale`` (0.2, AdamW's typical
RMS) whatever the shape and Muon can reuse AdamW's learning rate (Moonlight).
Weight decay is decoupled and multiplied by the schedule, as in our AdamW.

Which axes form the matrix comes from the params' logical names: the scanned
``layers`` axis is a batch axis (each layer's [in, out] kernel is its own
matrix), the other two are (reduction, output). A param that is not a matrix
(norm scales, LSQ steps, biases) fails the build naming the param: send it to
AdamW with a group rule before Muon's (``osp_groups`` does).

Two implementations with the same numbers (tests/test_muon.py):

* ``stacked=False``: ``optax.contrib.muon`` per leaf. Under FSDP the
  partitioner runs each Newton-Schulz matmul on a sharded matrix and
  all-reduces partial products every step of every iteration (a public report
  measured a 3.3x slower step).
* ``stacked=True`` (default): OSP's scheme. Matrices of one shape (after
  transposing tall ones: Newton-Schulz commutes with the transpose) are
  concatenated into one stack, padded with zero matrices to a multiple of the
  devices of ``stack_axes`` and split over them, so each device orthogonalises
  whole matrices; the results go back to each param's sharding. The moving is
  an all-to-all of the momentum there and back. The momentum state is kept in
  the params' layout.

OSP (Park et al., ACL 2025, arXiv 2506.19697) trains the hidden matrices and
EmbProj with Muon and the embeddings with AdamW: ``osp_groups``.

Matmul precision of Newton-Schulz: its dots pass no ``precision``, so they
run at JAX's default for their dtype (``jax_default_matmul_precision``
unset). With ``ns_dtype="float32"`` that is *not* full float32 on an
H100: JAX's default lets XLA compute float32 dots in TF32 on tensor cores
(10-bit mantissa; about half the bfloat16 dense peak, 495 vs 989 TFLOP/s)
and in bfloat16 passes on TPU (docs.jax.dev, "Matmul precision"); CPU
computes true float32. ``ns_dtype="bfloat16"`` (OSP's) runs bfloat16
operands at the full tensor-core rate (Jordan's reference Muon iterates in
bfloat16 too). To force full float32, run under
``jax.default_matmul_precision("highest")`` (several times slower on GPU).
``newton_schulz_flops`` counts the work per update (5 iterations over each
A x B matrix: 5 (4 m^2 n + 2 m^3), m = min(A, B), n = max(A, B)); it is per
optimizer step, so gradient accumulation (``config.train.grad_accum_steps``)
amortises it over more tokens.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from qtrain.config.validate import ConfigError
from qtrain.optim.groups import param_path
from qtrain.optim.registry import register_optimizer
from qtrain.parallel.mesh import AXES

# Logical names of axes that stack matrices rather than being one of their dims.
BATCH_NAMES = ("layers",)
# Jordan's quintic coefficients (also optax.contrib.muon's default).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("adamw", "muon")
# optax.contrib.muon arguments this module relies on (optax >= 0.2.7).
_MUON_ARGS = ("muon_weight_dimension_numbers", "consistent_rms", "nesterov")


@dataclasses.dataclass(frozen=True)
class Matrix:
  """How one param is a stack of matrices: ``batch`` axes, then the
  (reduction, output) axes of ``x @ W``; ``names`` are its logical axes."""
  shape: tuple[int, ...]
  batch: tuple[int, ...]
  reduction: int
  output: int
  names: tuple | None

  @property
  def dims(self) -> optax.contrib.MuonDimensionNumbers:
    return optax.contrib.MuonDimensionNumbers(self.reduction, self.output)

  @property
  def fan_in_out(self) -> tuple[int, int]:
    return self.shape[self.reduction], self.shape[self.output]


def matrix_of(path: str, leaf) -> Matrix:
  """The ``Matrix`` of a boxed (``nn.Partitioned``) or plain abstract param;
  ConfigError naming the param when it is not a matrix. Without logical
  names the leading axes are the stack (the scanned ``[L, in, out]`` layout)."""
  names = tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else None
  shape = tuple((leaf.value if isinstance(leaf, nn.Partitioned) else leaf).shape)
  if names is None:
    batch, rest = tuple(range(len(shape) - 2)), tuple(range(len(shape)))[-2:]
  else:
    batch = tuple(i for i, n in enumerate(names) if n in BATCH_NAMES)
    rest = tuple(i for i in range(len(shape)) if i not in batch)
  if len(rest) != 2 or min(shape[i] for i in rest) < 2 or (names and "norm" in names):
    axes = f", axes {names}" if names else ""
    raise ConfigError(
        f"config.optim.groups: param {path!r} (shape {shape}{axes}) is not a matrix, and "
        "Muon orthogonalises matrices; send it to adamw with a rule before Muon's, e.g. "
        "dict(pattern=r'.*norm.*|.*_(step|offset)$', optimizer='adamw') "
        "(qtrain.optim.muon.osp_groups does)")
  return Matrix(shape, batch, rest[0], rest[1], names)


def osp_groups(head: str = "adamw", embedding: str = "adamw") -> tuple[dict, ...]:
  """``config.optim.groups`` of OSP: Muon for the hidden matrices (attention
  q/k/v/o, MLP gate/up/down, their low-rank factors) and EmbProj; AdamW for
  LSQ steps, norms, the embedding and the LM head. ``embedding='muon'`` is the
  paper's Muon-dagger ablation; ``head='muon'`` sends the head to Muon (the
  paper does not say). No catch-all: a param of a new kind fails the build,
  listed, until a rule names it."""
  for name, value in (("head", head), ("embedding", embedding)):
    if value not in OPTIMIZERS:
      raise ValueError(f"osp_groups({name}={value!r}): use one of {OPTIMIZERS}")
  block = r"decoder/layers(_\d+)?"
  return (
      # LSQ steps and offsets live next to their kernels; first, so no matrix rule takes them.
      dict(pattern=r".*_(step|offset)$", optimizer="adamw"),
      dict(pattern=r".*norm.*", optimizer="adamw"),  # RMSNorm gains, SSNorm scalars.
      dict(pattern=r"embedding", optimizer=embedding),
      dict(pattern=r"lm_head/kernel", optimizer=head),
      dict(pattern=rf"{block}/(attn/(q|k|v|o)|mlp/(gate|up|down))_proj/(kernel|a|b)",
           optimizer="muon"),
      dict(pattern=r"(embed|head)_proj/kernel", optimizer="muon"),  # EmbProj.
  )


# -------------------------------------------------------------- stacked Muon --


class StackedMuonState(NamedTuple):
  count: jax.Array  # Updates applied (int32).
  mu: optax.Updates  # Momentum, shaped (and sharded) like the params.


def newton_schulz(x_BMN, steps: int, eps: float):
  """Jordan's quintic iteration X <- aX + (bA + cA^2)X, A = XX^T, on a stack of
  M x N matrices (M <= N), after dividing each by its Frobenius norm."""
  a, b, c = NS_COEFFS
  x = x_BMN / (jnp.linalg.norm(x_BMN, axis=(-2, -1), keepdims=True) + eps)
  for _ in range(steps):
    a_BMM = x @ x.mT
    x = a * x + (b * a_BMM + c * a_BMM @ a_BMM) @ x
  return x


def newton_schulz_flops(m: Matrix, steps: int) -> float:
  """Matmul FLOPs of ``newton_schulz`` over every matrix of ``m``'s stack. Per
  iteration on an M x N matrix (M <= N): X X^T 2M^2N, A A 2M^3, (bA + cA^2) X
  2M^2N; the norm and the element-wise terms are O(MN) and left out."""
  small, large = sorted(m.fan_in_out)
  count = math.prod(m.shape[i] for i in m.batch)
  return float(count * steps * (4 * small * small * large + 2 * small ** 3))


def _stack_axes(axes) -> tuple[tuple[str, ...], int]:
  """The mesh axes (of ``axes``) in the current mesh with more than one
  device, and how many devices they span; ((), 1) outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return (), 1
  used = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
  return used, math.prod(mesh.shape[a] for a in used)


def _as_stack(x, m: Matrix):
  """[B, M, N] with M <= N (tall matrices transposed), and whether it was."""
  order = m.batch + (m.reduction, m.output)
  fan_in, fan_out = m.fan_in_out
  x = x.transpose(order).reshape(-1, fan_in, fan_out)
  return (x.mT, True) if fan_in > fan_out else (x, False)


def _from_stack(x_BMN, transposed: bool, m: Matrix):
  if transposed:
    x_BMN = x_BMN.mT
  order = m.batch + (m.reduction, m.output)
  x = x_BMN.reshape(tuple(m.shape[i] for i in order))
  return x.transpose(tuple(sorted(range(len(order)), key=order.__getitem__)))


def orthogonalize_stacked(tree, matrices: dict[str, Matrix], *, ns_steps: int, eps: float,
                          rms_scale: float, ns_dtype, stack_axes):
  """Newton-Schulz of every leaf of ``tree`` (paths in ``matrices``), stacked
  by shape and split over ``stack_axes`` of the current mesh, times
  ``rms_scale * sqrt(max(fan_in, fan_out))``."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  axes, n_dev = _stack_axes(stack_axes)
  stacks: dict[tuple, list] = {}  # (M, N) -> [(leaf index, transposed, count)].
  parts: dict[tuple, list] = {}
  for i, (path, x) in enumerate(leaves):
    m = matrices[param_path(path)]
    x_BMN, transposed = _as_stack(x.astype(ns_dtype), m)
    key = x_BMN.shape[1:]
    if axes and key[0] % n_dev == 0:
      # Rows over every stack device first (an all-to-all from the param's
      # layout): the parts then concatenate locally and the stack reshards
      # rows -> matrices with one all-to-all. Straight from a 2-D-sharded
      # param XLA would replicate the stack ("involuntary full rematerialization").
      x_BMN = jax.lax.with_sharding_constraint(x_BMN, PartitionSpec(None, axes, None))
    stacks.setdefault(key, []).append((i, transposed, x_BMN.shape[0]))
    parts.setdefault(key, []).append(x_BMN)
  out = [None] * len(leaves)
  for key, members in stacks.items():
    x_SMN = jnp.concatenate(parts[key], axis=0)
    n = x_SMN.shape[0]
    pad = -n % n_dev  # Zero matrices stay zero: 0 / (0 + eps) = 0.
    if pad:
      x_SMN = jnp.pad(x_SMN, ((0, pad), (0, 0), (0, 0)))
    if axes:  # Each device: whole matrices of its slice of the stack.
      x_SMN = jax.lax.with_sharding_constraint(x_SMN, PartitionSpec(axes, None, None))
    x_SMN = newton_schulz(x_SMN, ns_steps, eps)
    if axes and key[0] % n_dev == 0:  # And back the same way.
      x_SMN = jax.lax.with_sharding_constraint(x_SMN, PartitionSpec(None, axes, None))
    start = 0
    for i, transposed, count in members:
      path, leaf = leaves[i]
      m = matrices[param_path(path)]
      u = _from_stack(x_SMN[start:start + count], transposed, m)
      start += count
      u = (rms_scale * math.sqrt(max(m.fan_in_out)) * u).astype(leaf.dtype)
      out[i] = nn.with_logical_constraint(u, m.names) if m.names else u
  return jax.tree_util.tree_unflatten(treedef, out)


def scale_by_stacked_muon(matrices: dict[str, Matrix], *, beta: float, nesterov: bool,
                          ns_steps: int, eps: float, rms_scale: float, mu_dtype,
                          ns_dtype, stack_axes) -> optax.GradientTransformation:
  """optax.contrib.muon's momentum (bias-corrected EMA, Nesterov), Newton-Schulz
  and consistent-RMS scaling, with the orthogonalisation stacked over devices."""

  def init(params):
    return StackedMuonState(jnp.zeros((), jnp.int32), optax.tree.zeros_like(params, mu_dtype))

  def update(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, beta, 1)
    count = optax.safe_increment(state.count)
    if nesterov:  # Exactly optax.contrib.scale_by_muon's Nesterov form.
      mu_hat = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g,
                            optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
                            optax.tree.bias_correction(updates, beta, count))
    else:
      mu_hat = optax.tree.bias_correction(mu, beta, count)
    out = orthogonalize_stacked(mu_hat, matrices, ns_steps=ns_steps, eps=eps,
                                rms_scale=rms_scale, ns_dtype=ns_dtype, stack_axes=stack_axes)
    return out, StackedMuonState(count, optax.tree.cast(mu, mu_dtype))

  return optax.GradientTransformation(init, update)


# ------------------------------------------------------------- the registry --


def build_muon(c, *, learning_rate, weight_decay, decay_mask, params):
  """Muon over the group's params ({path: abstract param}); see the module."""
  matrices = {path: matrix_of(path, leaf) for path, leaf in params.items()}
  mu_dtype = jnp.dtype(c.mu_dtype)
  if c.stacked:
    return optax.chain(
        scale_by_stacked_muon(matrices, beta=c.beta, nesterov=c.nesterov, ns_steps=c.ns_steps,
                              eps=c.eps, rms_scale=c.rms_scale, mu_dtype=mu_dtype,
                              ns_dtype=jnp.dtype(c.ns_dtype), stack_axes=tuple(c.stack_axes)),
        optax.add_decayed_weights(weight_decay, decay_mask),
        optax.scale_by_learning_rate(learning_rate))

  def dims(tree):  # Called on the group's (masked) tree: paths are the params'.
    return jax.tree_util.tree_map_with_path(lambda p, _: matrices[param_path(p)].dims, tree)

  return optax.contrib.muon(
      learning_rate, ns_steps=c.ns_steps, beta=c.beta, eps=c.eps, weight_decay=weight_decay,
      weight_decay_mask=decay_mask, mu_dtype=mu_dtype, nesterov=c.nesterov,
      muon_weight_dimension_numbers=dims, consistent_rms=c.rms_scale)


def validate_muon(c, where: str) -> None:
  missing = [a for a in _MUON_ARGS if a not in inspect.signature(optax.contrib.muon).parameters]
  if missing:
    raise ValueError(f"{where}: optax {optax.__version__} lacks optax.contrib.muon({missing}); "
                     "install optax>=0.2.7")
  if not 0.0 <= c.beta < 1.0:
    raise ValueError(f"{where}.beta={c.beta} must be in [0, 1)")
  if not (isinstance(c.ns_steps, int) and c.ns_steps >= 1):
    raise ValueError(f"{where}.ns_steps={c.ns_steps!r} must be an int >= 1 (5 is Muon's)")
  if not c.eps > 0:
    raise ValueError(f"{where}.eps={c.eps} must be > 0")
  if not c.rms_scale > 0:
    raise ValueError(f"{where}.rms_scale={c.rms_scale} must be > 0 (0.2 matches AdamW's RMS)")
  for field in ("mu_dtype", "ns_dtype"):
    if c[field] not in DTYPES:
      raise ValueError(f"{where}.{field}={c[field]!r}; use one of {DTYPES}")
  if c.ns_dtype != "float32" and not c.stacked:
    raise ValueError(f"{where}.ns_dtype={c.ns_dtype!r} needs {where}.stacked=True "
                     "(optax.contrib.muon iterates in the momentum's dtype)")
  bad = [a for a in c.stack_axes if a not in AXES]
  if bad:
    raise ValueError(f"{where}.stack_axes={tuple(c.stack_axes)} names {bad}; use mesh axes "
                     f"of {AXES}")


register_optimizer("muon", build_muon, validate_muon)

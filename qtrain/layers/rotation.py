"""Orthogonal rotations for quantization: Hadamard matrices of many orders,
randomized Hadamard, learned (Cayley) rotations, and the online transform.

Rotating a matmul's input by an orthogonal R and its weight by R^T leaves the
product unchanged, (x R)(R^T W) = x W, while it spreads an outlier channel of
x over all channels, so a 4-bit quantizer of x R loses less to it (QuaRot,
Ashkboos et al. 2024; SpinQuant, Liu et al. 2024; RoSTE, Wei et al. 2025).

**Hadamard matrices** H (entries +-1, H H^T = n I) are built here for
n = 2^k * m, as the Kronecker product H_m (x) H_{2^k} of

* Sylvester's H_{2^k} = H_2^{(x)k} (``fwht`` of ``qtrain.layers.hadamard``), and
* a Paley matrix of order m (m = 1: none), generated from the Legendre symbol
  chi of a prime q (Paley 1933):
  - Paley I, q = 3 (mod 4): m = q + 1. The Jacobsthal matrix
    Q[i, j] = chi(j - i) is skew; S = [[0, 1^T], [-1, Q]], H = I + S.
  - Paley II, q = 1 (mod 4): m = 2(q + 1). Q is symmetric; the conference
    matrix C = [[0, 1^T], [1, Q]] gives H = C (x) [[1, -1], [-1, -1]]
    + I (x) [[1, 1], [1, -1]].

No table is pasted; ``supported(n)`` says whether n is reachable this way (12,
20, 28, 36, 40, 44, llama_1b's d_ff 5632 = 44 * 2^7 are; 52, 92 and 172 are
not: Hadamard matrices of those orders exist, but need prime-power fields or
other constructions). Llama-2-7B's 11008 = 5504 * 2 is, through Paley I with
q = 5503, but its dense part is 5504 x 5504.
Among the factorisations of n the one with the smallest m is used, so the
dense part of the fast transform is as small as it can be.

**The fast transform** ``hadamard_transform(x, signs, impl=...)`` = x diag(s)
H / sqrt(n) over the last axis. Paley matrices are not symmetric, so the
inverse transform uses H^T: ``inverse=True``. Two ways:

* "fwht" (weight folding's default): x viewed as [..., m, 2^k], H_{2^k} by the
  O(n log n) butterfly and H_m by an m x m matmul, float32 at HIGHEST
  precision (no TF32 pass on GPU: folded weights need the exact rotation).
* "matmul" / "matmul_bf16" (the online R3/R4 during training): +-1 matmuls in
  x's dtype, bf16 on a GPU, accumulating in float32. The entries +-1 and the
  signs are exact in bf16, so every product is exact and only the float32
  sums round before the one rounding to x's dtype. One dense n x n gemm up to
  n = 256 (head_dim 64: cheaper than any factorisation, since the cost is
  passes over memory, not FLOPs); above, H = H_a (x) H_b with x as [T, a, b]:
  a gemm over the minor axis (H_b, Sylvester, <= 128) and a gemm batched over
  rows with H_a^T broadcast as its left operand, so no axis moves and XLA
  copies nothing (llama_1b's d_ff 5632 = 44 x 128). "matmul" keeps the
  [T, a, b] intermediate in float32 (the result is the exact product rounded
  once); "matmul_bf16" rounds it to x's dtype (half the bytes, both gemms on
  bf16 tensor cores, one more rounding: tests/test_rotation.py bounds both).
  Their VJP is the inverse transform of the cotangent, run the same way.

**Randomized Hadamard** (QuaRot): diag(s) H / sqrt(n) with seeded random signs
s (``random_signs``); orthogonal, its inverse is H^T diag(s) / sqrt(n).

**Learned rotation** (SpinQuant trains R on the Stiefel manifold; the Cayley
map parameterises it without constraints): R = (I - A)(I + A)^{-1}, A skew
(A^T = -A), is orthogonal for every A, and R^{-1} = R^T (``cayley``,
``cayley_inverse``; ``LearnedRotation`` holds A's free param).

``online(...)`` applies an online rotation (R3 on Q/K after RoPE, R4 on the
down_proj input) as the layers call it: identity when off, and per block a
``lax.cond`` on a static table indexed by the (traced) block index, so a
scanned stack stays one compiled block. Its output is named (``ROTATED``:
``checkpoint_name``) so a remat policy can keep it: ``remat_policy`` adds the
names to the block's policy when ``config.model.rotation.save`` is on.
Without it, what the backward pass recomputes depends on how the transform
was built: under ``dots_no_batch`` a dense gemm (head_dim 64) is itself a
saved dot, but of llama_1b's d_ff = 44 x 128 only the 128 gemm's output is
kept and the row-batched 44 gemm runs again, and under ``full`` every gemm of
every rotation runs a second time. Saved, none runs again, and the rotated
tensor (x's dtype) replaces the dot output that was kept (x's size, float32
for ``matmul``), so under ``dots_no_batch`` the memory does not grow.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from qtrain.layers.hadamard import fwht


def _is_prime(q: int) -> bool:
  if q < 2:
    return False
  return all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley_kind(m: int) -> str | None:
  """'I' or 'II' when a Paley construction gives order m (I preferred)."""
  if _is_prime(m - 1) and (m - 1) % 4 == 3:
    return "I"
  if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
    return "II"
  return None


def factor(n: int) -> tuple[int, int] | None:
  """(m, 2^k) with n = m * 2^k, m = 1 or a Paley order, m as small as
  possible; None when no such split exists."""
  if n < 1:
    return None
  p = n & -n  # The largest power of two dividing n.
  while p >= 1:
    m = n // p
    if m == 1 or _paley_kind(m):
      return m, p
    p //= 2
  return None


def supported(n: int) -> bool:
  """Whether ``hadamard_matrix(n)`` exists here (Sylvester x Paley I/II)."""
  return factor(n) is not None


def nearest_supported(n: int) -> tuple[int | None, int]:
  """The largest supported size below n (None if none) and the smallest above."""
  below = next((k for k in range(n - 1, 0, -1) if supported(k)), None)
  above = next(k for k in range(n + 1, 4 * n + 8) if supported(k))
  return below, above


def require_supported(n: int, where: str) -> None:
  """ValueError naming ``where`` and the nearest supported sizes unless n is supported."""
  if not supported(n):
    below, above = nearest_supported(n)
    raise ValueError(
        f"{where}={n}: no Hadamard matrix of order {n} here (n = 2^k * m with m = 1, "
        f"q + 1 for a prime q = 3 mod 4, or 2(q + 1) for a prime q = 1 mod 4); the nearest "
        f"supported sizes are {below} and {above}")


def _legendre(q: int) -> np.ndarray:
  """chi(a) for a = 0..q-1: 0, +1 on quadratic residues, -1 otherwise."""
  chi = -np.ones(q, np.int64)
  chi[0] = 0
  chi[np.unique(np.arange(1, q, dtype=np.int64) ** 2 % q)] = 1
  return chi


def _jacobsthal(q: int) -> np.ndarray:
  i = np.arange(q)
  return _legendre(q)[(i[None, :] - i[:, None]) % q]  # Q[i, j] = chi(j - i).


def _paley(m: int) -> np.ndarray:
  kind = _paley_kind(m)
  if kind == "I":
    q = m - 1
    s = np.zeros((m, m), np.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return np.eye(m, dtype=np.int64) + s
  q = m // 2 - 1
  c = np.zeros((q + 1, q + 1), np.int64)
  c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
  return (np.kron(c, np.array([[1, -1], [-1, -1]]))
          + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, 1], [1, -1]])))


def _sylvester(p: int) -> np.ndarray:
  h = np.ones((1, 1), np.int64)
  while h.shape[0] < p:
    h = np.block([[h, h], [h, -h]])
  return h


@functools.lru_cache(maxsize=64)
def _matrix(n: int) -> np.ndarray:
  split = factor(n)
  if split is None:
    require_supported(n, "n")
  m, p = split
  h = _sylvester(p) if m == 1 else np.kron(_paley(m), _sylvester(p))
  h = h.astype(np.float64)
  h.setflags(write=False)
  return h


def hadamard_matrix(n: int) -> np.ndarray:
  """The unnormalised Hadamard matrix H_m (x) H_{2^k} of order n, float64
  (H H^T = n I); ValueError with the nearest sizes when n is unsupported."""
  return _matrix(n).copy()


def random_signs(n: int, seed: int) -> np.ndarray:
  """n random +-1 (float64) from ``seed``: the randomized Hadamard's diag(s)."""
  return np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=n)


IMPLS = ("fwht", "matmul", "matmul_bf16")
# Up to this order one dense +-1 matmul (2n multiply-adds per element, on
# tensor cores) is cheaper than a factorisation's extra pass over memory:
# head_dim 64 and 128 are one [.., n] x [n, n] gemm.
_DENSE_MAX = 256
_BLOCK = 128  # Largest Sylvester factor the minor-axis matmul applies.
# Float32 operands exactly (no TF32 pass on a GPU); no effect on bf16 ones.
_EXACT = jax.lax.Precision.HIGHEST


def _split(n: int) -> tuple[int, int]:
  """(a, b) with H_n = H_a (x) H_b (our Hadamard matrix exactly): (1, n), one
  dense matmul, up to _DENSE_MAX or without a power-of-two part; else b the
  trailing Sylvester block (<= _BLOCK) on the minor axis and H_a =
  ``hadamard_matrix(n // b)`` (H_{2^k} = H_{2^(k-j)} (x) H_{2^j}, so
  H_m (x) H_{2^k} = (H_m (x) H_{2^(k-j)}) (x) H_{2^j})."""
  p = factor(n)[1]
  if n <= _DENSE_MAX or p == 1:
    return 1, n
  b = min(p, _BLOCK)
  return n // b, b


def _pow4(n: int) -> bool:
  """1/sqrt(n) is a power of two (n = 4^j), exact in every float dtype."""
  return n & (n - 1) == 0 and (n.bit_length() - 1) % 2 == 0


def _pm1(h: np.ndarray, dtype):
  """A +-1 matrix as a constant of ``dtype`` (exact in every float dtype)."""
  return jnp.asarray(h, dtype)


def _by_matmuls(x, s, inverse: bool, low: bool):
  """x diag(s) H / sqrt(n) (inverse: x H^T diag(s) / sqrt(n)) over the last
  axis by matmuls with +-1 matrices in x's dtype, accumulating in float32.

  n <= _DENSE_MAX: one dense matmul with diag(s) H (H^T diag(s)) folded into
  one +-1 matrix, then one rounding to x's dtype. Larger n = a * b: x viewed
  as X [a, b] per row, X -> H_a^T X H_b (H_a X H_b inverse: Sylvester is
  symmetric, H^T = H_a^T (x) H_b) in two contractions that leave every axis
  where it is: X H_b a plain gemm over the minor axis, then H_a^T U a gemm
  batched over the rows whose left operand H_a^T is broadcast over them (XLA
  folds such a broadcast into a zero batch stride on GPU instead of
  transposing U).
  ``low`` False keeps U in float32 (one rounding at the end: the result is the
  exact product rounded once); True rounds U to x's dtype so the second gemm
  also runs on bf16 tensor cores (two roundings). 1/sqrt(n) scales the float32
  accumulator of the last matmul (fused into its epilogue): folded into a
  bf16 matrix it would round, and the transform would stop being orthogonal,
  unless n = 4^j (head_dim 64: 1/8), where it is folded and the gemm writes
  x's dtype itself.
  """
  n, dtype = x.shape[-1], x.dtype
  scale = np.float32(1 / math.sqrt(n))
  a, b = _split(n)
  signs = np.ones(n) if s is None else s
  if a == 1:
    h = _matrix(n)
    r = h.T * signs[None, :] if inverse else signs[:, None] * h
    if _pow4(n):  # The gemm's float32 accumulator rounds once, to x's dtype.
      return jnp.einsum("...i,ij->...j", x, jnp.asarray(r * scale, dtype), precision=_EXACT,
                        preferred_element_type=dtype)
    y = jnp.einsum("...i,ij->...j", x, _pm1(r, dtype), precision=_EXACT,
                   preferred_element_type=jnp.float32)
    return (y * scale).astype(dtype)
  lead = x.shape[:-1]
  if s is not None and not inverse:
    x = x * s.astype(dtype)  # +-1: exact; XLA fuses it into x's producer.
  # low: U leaves the gemm rounded to x's dtype (its accumulator is float32).
  u = jnp.einsum("...ab,bc->...ac", x.reshape(*lead, a, b), _pm1(_sylvester(b), dtype),
                 precision=_EXACT, preferred_element_type=dtype if low else jnp.float32)
  h_a = _matrix(a) if inverse else _matrix(a).T  # The left factor: [d, a].
  h_a = jnp.broadcast_to(_pm1(h_a, dtype if low else jnp.float32), (*lead, a, a))
  k = len(lead)  # Lead axes are the batch: rows stay where (and as sharded as) they are.
  y = jax.lax.dot_general(h_a, u, (((k + 1,), (k,)), (tuple(range(k)), tuple(range(k)))),
                          precision=_EXACT, preferred_element_type=jnp.float32) * scale
  if s is not None and inverse:
    y = y * s.reshape(a, b)
  return y.reshape(*lead, n).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul_transform(x, s, inverse: bool, low: bool):
  return _by_matmuls(x, s, inverse, low)


def _matmul_fwd(x, s, inverse, low):
  return _by_matmuls(x, s, inverse, low), s


def _matmul_bwd(inverse, low, s, g):
  """The transform is x R with R orthogonal: its VJP is g R^T, the inverse
  transform of g, run the same way in g's dtype (autodiff of the forward
  would run the backward matmuls on the float32 cotangent of its accumulator)."""
  return _by_matmuls(g, s, not inverse, low), None if s is None else jnp.zeros_like(s)


_matmul_transform.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.jit, static_argnames=("inverse", "impl"))
def hadamard_transform(x, signs=None, inverse: bool = False, impl: str = "fwht"):
  """x diag(s) H / sqrt(n) over the last axis (``inverse``: x H^T diag(s) / sqrt(n),
  which undoes it); ``signs`` None means s = 1. x's dtype out.

  ``impl``: "fwht", the butterfly over the 2^k factor (log2 of it passes of
  adds) and an m x m matmul, float32 inside; "matmul", +-1 matmuls in x's dtype
  accumulating in float32 (head_dim 64: one 64 x 64 gemm; d_ff 5632 = 44 * 128:
  a 128 gemm over the minor axis and a 44 one batched over rows, the
  intermediate in float32), which run on tensor cores without transposes; the
  result is the exact product rounded once to x's dtype (float32 x: float32
  rounding). "matmul_bf16" rounds that intermediate to x's dtype too (bf16 on
  a GPU: both gemms on bf16 tensor cores, half the bytes; one more rounding
  where n > 256). Their gradient is the inverse transform of the cotangent
  (``_matmul_bwd``).

  A jitted function of its own, so the compiled program of a model shows each
  online rotation as one ``call @hadamard_transform``.
  """
  n = x.shape[-1]
  require_supported(n, "hadamard_transform: the last axis")
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; use one of {IMPLS}")
  m, p = factor(n)
  lead = x.shape[:-1]
  s = None if signs is None else jnp.asarray(signs, jnp.float32)
  if impl != "fwht":
    return _matmul_transform(x, s, inverse, impl == "matmul_bf16")
  y = x.astype(jnp.float32)
  if s is not None and not inverse:
    y = y * s
  if m > 1:  # H_m on the m axis of [..., m, p]; H_m^T for the inverse.
    h_m = _paley(m).astype(np.float32) / np.float32(math.sqrt(m))
    h_m = h_m.T if inverse else h_m
    y = jnp.einsum("...ap,ab->...bp", y.reshape(*lead, m, p), jnp.asarray(h_m),
                   precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32).reshape(*lead, n)
  if p > 1:  # Sylvester is symmetric: the same butterfly both ways.
    y = fwht(y.reshape(*lead, m, p)).reshape(*lead, n)
  if s is not None and inverse:
    y = y * s
  return y.astype(x.dtype)


def rotation_matrix(n: int, signs=None) -> np.ndarray:
  """The dense orthogonal R = diag(s) H / sqrt(n) that ``hadamard_transform``
  applies (float64; for folding and tests)."""
  h = hadamard_matrix(n) / math.sqrt(n)
  return h if signs is None else np.asarray(signs, np.float64)[:, None] * h


def skew(w):
  """A = W - W^T: an unconstrained square param made skew-symmetric."""
  return w - jnp.swapaxes(w, -1, -2)


def cayley(a):
  """R = (I - A)(I + A)^{-1} for skew A (orthogonal; I + A is always
  invertible since A's eigenvalues are imaginary). (I - A) and (I + A)^{-1}
  commute, so R = (I + A)^{-1}(I - A): one solve."""
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  return jnp.linalg.solve(eye + a, eye - a)


def cayley_inverse(a):
  """R^{-1} = R^T = (I - A)^{-1}(I + A) of ``cayley(a)``."""
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  return jnp.linalg.solve(eye - a, eye + a)


class LearnedRotation(nn.Module):
  """R = cayley(skew(W)) [n, n], W an unconstrained param (zeros: R = I):
  SpinQuant's learned R1 / R2, trained by plain gradient steps on W while R
  stays orthogonal; ``fuse_rotations(..., r1=R)`` folds the result."""
  n: int

  @nn.compact
  def __call__(self):
    w = self.param("w", nn.initializers.zeros, (self.n, self.n), jnp.float32)
    return cayley(skew(w))


# Which rotation a random_hadamard seed belongs to: each draws its own signs.
_STREAM = {"r1": 1, "r2": 2, "r3": 3, "r4": 4}


def signs_for(rot, which: str, n: int, layer: int = 0) -> np.ndarray | None:
  """The random signs of rotation ``which`` of ``rot`` (a RotationConfig) at
  block ``layer`` (R2 differs per block; R1, R3, R4 use layer 0), or None
  unless its kind is random_hadamard."""
  if getattr(rot, which) != "random_hadamard":
    return None
  return random_signs(n, [rot.seed, _STREAM[which], layer])


def online(cfg, which: str, layer, x):
  """x rotated over its last axis by the online rotation ``which`` ('r3' on Q
  and K, 'r4' on the down_proj input) of ``cfg.rotation`` at block ``layer``
  (an int, a traced int32 under ``nn.scan``); x itself where it is off.

  Blocks that differ under scan take ``lax.cond`` on a static per-block
  table: one compiled block, only the taken branch runs."""
  rot = Online.at(cfg, which, layer)
  return x if rot is None else rot.apply(x)


@dataclasses.dataclass(frozen=True, eq=False)
class Online:
  """One online rotation ``which`` at one block, as ``online`` applies it and
  as a matmul hook takes it for its activation operand
  (``Hooks.lhs_rotation``, R4 on down_proj: ``qtrain.layers.mlp``).

  **The gradient through the weight.** With y = (x R) W^, the backward of the
  rotation is dx = (dy W^^T) R^T: a second pass over the [tokens, d_ff]
  cotangent per block. The same product is dy (R W^)^T, where R W^ rotates the
  weight operand the innermost dot received (W^: the weight after any weight
  quantizer) over its contraction axis, d_ff x d_model values instead of
  tokens x d_ff (llama_1b at 8 x 2048: 8x fewer). ``Hooks.dot_fn`` runs it so
  (``grad_through_weight``, the rotation's own backward then the identity)
  when ``fold`` is on and every provider between the rotation and the dot
  passes the activations' cotangent through unchanged
  (``Provider.lhs_grad_passes``: no quantizer of the activations, or a plain
  STE one); anywhere else (clipped STE, learned steps, the int8/fp8 custom
  VJPs, whose backward dots are their own) it rotates the cotangent as
  ``online`` does. Same gradients up to rounding: the folded one rounds R W^
  to the compute dtype once (its 1/sqrt(n)-scaled float32 sums), the other
  rounds dy W^^T and the transform's intermediate.
  """
  which: str
  n: int  # The rotated axis' size.
  signs: tuple | None  # Random signs (random_hadamard), else None.
  impl: str
  on: tuple[bool, ...]  # Per block.
  layer: Any  # Block index: int, traced int32 under nn.scan, or None.
  fold: bool = True

  @classmethod
  def at(cls, cfg, which: str, layer) -> "Online | None":
    """The rotation ``which`` of ``cfg.rotation`` at block ``layer``; None
    where it is off in every block."""
    rot = cfg.rotation
    on = rot.blocks(which, cfg.n_layers)
    if not any(on):
      return None
    if not all(on) and layer is None:
      raise ValueError(f"config.model.rotation.{which}_layers names blocks, but this "
                       f"{which} site sits outside the decoder stack")
    n = {"r3": cfg.head_dim, "r4": cfg.d_ff}[which]
    signs = signs_for(rot, which, n)
    return cls(which, n, None if signs is None else tuple(signs.tolist()), rot.impl, on, layer,
               fold=rot.fold_grad)

  def on_here(self):
    """Whether this block rotates: a Python bool, or a traced bool under
    ``nn.scan`` where the blocks differ."""
    if all(self.on):
      return True
    if isinstance(self.layer, int):
      return self.on[self.layer]
    return jnp.asarray(self.on)[self.layer]

  def apply(self, x, grad: bool = True):
    """x R over the last axis, named ``ROTATED[which]`` (outside the cond:
    the remat policy sees one tensor whichever branch ran). ``grad`` False:
    the backward passes the cotangent through unchanged, for a dot whose
    gradient applies R^T itself (``grad_through_weight``)."""
    signs = _signs_array(self.signs)
    rotate = lambda y: hadamard_transform(y, signs, impl=self.impl)
    return checkpoint_name(_where(self.on_here(), rotate if grad else _no_grad(rotate), x),
                           ROTATED[self.which])

  def grad_through_weight(self, inner):
    """The innermost dot ``inner`` (module, lhs, rhs, dims, ...) whose lhs
    cotangent is dy (R rhs)^T: R^T applied through the weight (see the class)."""
    on = self.on_here()
    weight = _WeightRotation(self.signs, "fwht" if self.impl == "fwht" else "matmul")

    def fn(module, lhs, rhs, dims, precision=None, preferred_element_type=None):
      if on is False:  # This block does not rotate: the plain dot.
        return inner(module, lhs, rhs, dims, precision, preferred_element_type)
      # A static True needs no flag (None: no leaves); a traced one picks per block.
      return _dot_grad_through_weight(lhs, rhs, None if on is True else on, weight, dims,
                                      precision, preferred_element_type)

    return fn


def _where(on, f, x):
  """f(x) where ``on`` (a Python bool, or a traced bool: ``lax.cond``), else x."""
  if isinstance(on, bool):
    return f(x) if on else x
  return jax.lax.cond(on, f, lambda y: y, x)


def _signs_array(signs):
  return None if signs is None else np.asarray(signs, np.float32)


def _no_grad(rotate):
  """``rotate`` whose VJP is the identity (the dot after it applies R^T)."""
  f = jax.custom_vjp(rotate)
  f.defvjp(lambda x: (rotate(x), None), lambda _, g: (g,))
  return f


@dataclasses.dataclass(frozen=True)
class _WeightRotation:
  """R applied to a weight operand over its contraction axis (hashable: a
  nondiff arg of ``_dot_grad_through_weight``)."""
  signs: tuple | None
  impl: str

  def __call__(self, w, axis: int):
    """R w over ``axis``: (w^T R^T)^T, the inverse transform of the rows of
    w with ``axis`` last. ``impl`` "matmul" keeps the float32 intermediate
    (one rounding), "fwht" as the forward."""
    w_t = rotate_weight(jnp.moveaxis(w, axis, -1), _signs_array(self.signs), self.impl)
    return jnp.moveaxis(w_t, -1, axis)


@functools.partial(jax.jit, static_argnames=("impl",))
def rotate_weight(w, signs, impl: str):
  """w R^T over the last axis; a jitted function of its own, so the step's
  program names it apart from the activations' transforms (``transform_gemms``)."""
  return hadamard_transform(w, signs, inverse=True, impl=impl)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _dot_grad_through_weight(lhs, rhs, flag, weight, dims, precision, preferred_element_type):
  del flag, weight  # The backward's.
  return jax.lax.dot_general(lhs, rhs, dims, precision=precision,
                             preferred_element_type=preferred_element_type)


def _dgtw_fwd(lhs, rhs, flag, weight, dims, precision, preferred_element_type):
  out = _dot_grad_through_weight(lhs, rhs, flag, weight, dims, precision, preferred_element_type)
  return out, (lhs, rhs, flag)


def _dgtw_bwd(weight, dims, precision, preferred_element_type, res, g):
  lhs, rhs, flag = res  # flag None: every block rotates.
  axis = dims[0][1][0] % rhs.ndim
  rhs_r = _where(True if flag is None else flag, lambda w: weight(w, axis), rhs)
  dot = lambda l, r: jax.lax.dot_general(l, r, dims, precision=precision,
                                         preferred_element_type=preferred_element_type)
  d_lhs = jax.vjp(lambda l: dot(l, rhs_r), lhs)[1](g)[0]
  d_rhs = jax.vjp(lambda r: dot(lhs, r), rhs)[1](g)[0]
  return d_lhs, d_rhs, None


_dot_grad_through_weight.defvjp(_dgtw_fwd, _dgtw_bwd)


# The names ``online`` gives the rotated tensors (R3: Q and K; R4: the
# down_proj input), for ``jax.checkpoint_policies.save_only_these_names``.
ROTATED = {"r3": "r3_rotated", "r4": "r4_rotated"}


def remat_policy(rot, policy):
  """The block's remat ``policy``, also saving the rotated tensors when
  ``rot.save`` (a RotationConfig): the backward then reads them instead of
  running their transforms again (see the module docstring)."""
  if not rot.save:
    return policy
  saved = jax.checkpoint_policies.save_only_these_names(*ROTATED.values())
  return jax.checkpoint_policies.save_from_both_policies(policy, saved)


def transform_gemms(jaxpr, weights: bool = False) -> int:
  """How many dot_generals of ``jaxpr`` (a Jaxpr or ClosedJaxpr, e.g. of a
  train step) run inside ``hadamard_transform`` calls on activations (or
  cotangents): forward, remat recomputation and custom VJP alike,
  sub-jaxprs included (a scan body once, each cond branch). ``weights``: those
  inside ``rotate_weight`` instead (R4's backward through the weight). Read
  from the jaxpr, where JAX's remat has decided what runs again, not from
  compiled HLO, whose ops differ by backend."""
  from qtrain.analysis import jaxprs  # pylint: disable=g-import-not-at-top
  named = lambda name: lambda e: name in str(e.params.get("name", ""))
  in_transform, on_weight = named("hadamard_transform"), named("rotate_weight")
  return sum(eqn.primitive.name == "dot_general" and any(map(in_transform, outer))
             and any(map(on_weight, outer)) == weights
             for eqn, outer in jaxprs.eqns(jaxpr))


def check_rotation(m) -> None:
  """ValueError naming the field unless ``m``'s (a ModelConfig, or config.model
  as a ConfigDict) rotations fit it: known kinds, supported sizes, blocks in
  range, and R4 not doubled by ``ffn_hadamard``."""
  from qtrain.layers.config import (  # pylint: disable=g-import-not-at-top
      FUSED_ROTATIONS, ONLINE_ROTATIONS, RotationConfig)
  raw = getattr(m, "rotation", None)
  if raw is None:
    return
  rot = RotationConfig.of(raw)
  dims = {"r1": ("d_model", m.d_model), "r2": ("head_dim", m.head_dim),
          "r3": ("head_dim", m.head_dim), "r4": ("d_ff", m.d_ff)}
  for which, (field, n) in dims.items():
    kind, where = getattr(rot, which), f"config.model.rotation.{which}"
    kinds = ONLINE_ROTATIONS if which in ("r3", "r4") else FUSED_ROTATIONS
    if kind not in kinds:
      extra = (" (a learned rotation is fused: r1 or r2)" if kind == "learned" else "")
      raise ValueError(f"{where}={kind!r}; use one of {kinds}{extra}")
    if kind not in ("none", "learned"):
      require_supported(n, f"{where}={kind!r} rotates over config.model.{field}")
    layers = getattr(rot, f"{which}_layers", None)
    bad = [i for i in layers or () if i >= m.n_layers]
    if bad:
      raise ValueError(f"{where}_layers names block {bad[0]}, but config.model.n_layers="
                       f"{m.n_layers}: use indices 0..{m.n_layers - 1}")
  if rot.impl not in IMPLS:
    raise ValueError(f"config.model.rotation.impl={rot.impl!r}; use one of {IMPLS}")
  for field in ("save", "fold_grad"):
    if not isinstance(getattr(rot, field), bool):
      raise ValueError(f"config.model.rotation.{field}={getattr(rot, field)!r}; "
                       "use True or False")
  if rot.save and rot.r3 == rot.r4 == "none":
    raise ValueError("config.model.rotation.save=True saves the online rotations' outputs, but "
                     "r3 and r4 are 'none': turn one on or set save=False")
  if rot.save and m.remat_policy == "none":
    raise ValueError("config.model.rotation.save=True adds the rotated tensors to the remat "
                     "policy, but config.model.remat_policy='none' keeps every activation "
                     "already: choose a policy (e.g. 'dots_no_batch') or set save=False")
  if rot.r4 != "none" and m.ffn_hadamard:
    raise ValueError("config.model.rotation.r4 and config.model.ffn_hadamard both rotate the "
                     "down_proj input: ffn_hadamard=True is r4='hadamard' on every block; "
                     "keep one")

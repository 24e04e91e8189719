"""GPTQ and AWQ post-training quantization, with qwix.contrib where it serves.

What comes from qwix 0.1.8 (``qwix.contrib``) and what is ours:

* Calibration statistics: ours collect them, qwix's functions compute them.
  A provider (``StatsProvider``) wraps every matmul a recipe quantizes; it
  sows, per batch and over real tokens only (padding is masked out), qwix's
  ``gptq_core.compute_hessian`` (H = X^T X, here divided by the token count)
  and ``awq_core.compute_act_scale`` (mean |x| per input channel) of the
  matmul's input; scanned layers stack them on the layer axis. Batches are
  averaged, as qwix's ``SimpleMovingAverage`` does. qwix's own calibration
  providers are not used: they work through qwix's interception of
  ``jax.lax.dot_general`` (monkey-patching, which STYLE.md keeps out of our
  matmul path) and find the weight by object identity
  (``flax_util.find_param``), while our model already names every matmul by
  module path; and they return qwix ``PtqProvider`` param trees, not codes on
  our grid.
* AWQ: the per-input-channel scale search is qwix's
  ``awq_core.search_optimal_scales`` (s = a^r, r on an ``n_grid`` grid in
  [0, 1], a the activation scale, minimising the activation-weighted weight
  error), one s for the matmuls that read one norm's output (q/k/v,
  gate/up); the weight diag(s) W ([in, out]) is then quantized by our
  ``qtrain.quant`` quantizer, so the codes sit on the recipe's grid. The
  model runs Q_a(x / s) Q(diag(s) W): 1/s folded into the norm or applied
  explicitly to the input (``awq_fold``), so that an activation quantizer
  sees x / s. (qwix's ``AwqInferenceProvider`` divides the weight by s
  instead, which is right for weight-only quantization only.) The
  search quantizes with qwix numerics set to our grid (``qwix_how``):
  symmetric int scales absmax / Q_P (qwix divides by Q_P + 1/2, so the
  calibration carries the factor (Q_P + 1/2) / Q_P), asymmetric int4/int8
  min/max grids equal ours shifted by 2^(b-1).
* GPTQ is ours (``gptq``): Frantar et al. 2022, Alg. 1 — the dampened
  Hessian's inverse as an upper Cholesky factor, columns quantized in blocks
  of ``blocksize`` with the error err = (w - q) / [H^-1]_jj propagated to the
  later columns of the block, then ``Err @ H^-1[block, rest]`` to the rest;
  group scales found at each group's first column from the weights as updated
  by earlier blocks (the reference implementation's order); optional act-order
  (columns by decreasing H_jj). qwix 0.1.8's ``gptq_core.quantize_weight``
  implements the same algorithm but was unusable here: it unrolls the column
  loop in Python (one 192x512 matrix took 74 s eagerly and 142 s to compile
  on 2 shared CPU cores; ours: 4.5 s, compile included), asymmetric weights crash it (``zero_point and
  zero_point.squeeze(1)`` on an array), and it quantizes on qwix's grid
  (absmax / (Q_P + 1/2), codes down to -2^(b-1)), not ours. Ours runs each
  block as a ``lax.fori_loop`` under one jit, vmapped over layers, quantizes
  every column with ``qtrain.quant`` numerics, and is tested against a float64
  NumPy transcription of the reference and against qwix's implementation.

Both methods use statistics of the unquantized model in one pass (qwix's
single-pass calibration), not the layer-by-layer sequential variant.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from qwix._src.core import qarray
from qwix.contrib import awq_core, gptq_core

from qtrain.layers import ModelConfig, Provider, Transformer
from qtrain.quant import QTensor, QuantSpec, quantize
from qtrain.quant.calibration import sum_sown
from qtrain.quant.quantizer import FP8_DTYPES, codes, grid
from qtrain.quantize import awq_fold
from qtrain.quantize.export import QuantizedWeight
from qtrain.quantize.rtn import get_param, quantize_params_rtn, quantize_rtn

STATS = "ptq_stats"
KINDS = ("hessian", "act_scale")

# --- calibration statistics ---------------------------------------------------


def _input_stats(x_NK, w_N, kinds):
  """{kind: statistic} of matmul inputs x_NK with token weights w_N (1 real, 0 padding)."""
  n = jnp.maximum(jnp.sum(w_N), 1.0)
  out = {}
  if "hessian" in kinds:  # qwix's X @ X.T with X [in, samples], padding rows zeroed.
    out["hessian"] = gptq_core.compute_hessian((x_NK * w_N[:, None]).T) / n
  if "act_scale" in kinds:  # qwix's mean |x| per input channel, over real tokens only.
    out["act_scale"] = jnp.sum(jnp.abs(x_NK) * w_N[:, None], axis=0) / n
  return out


@dataclasses.dataclass(frozen=True)
class StatsProvider(Provider):
  """Sows statistics of the input (lhs) of the matmuls at ``paths`` (site
  paths as in ``WeightSite.path``), over real tokens only (the hooks' token
  mask drops padding), then calls the dot below it unchanged. It composes:
  placed outermost it sees what the model's own providers receive."""
  paths: frozenset
  kinds: tuple[str, ...] = KINDS
  where: dict = dataclasses.field(default_factory=dict, compare=False)  # path -> scope path.

  def dot(self, site, hooks, inner):
    path = site.module_path
    if path not in self.paths:
      return inner

    def observed(module, lhs, rhs, dims, precision=None, preferred_element_type=None):
      (lc, _), _ = dims
      x_NK = jnp.moveaxis(lhs, lc[0], -1)
      x_NK = x_NK.reshape(-1, x_NK.shape[-1]).astype(jnp.float32)
      mask = hooks.token_mask
      w_N = (jnp.ones(x_NK.shape[:1]) if mask is None
             else jnp.broadcast_to(mask, lhs.shape[:mask.ndim]).reshape(-1).astype(jnp.float32))
      self.where[path] = tuple(module.scope.path)
      for kind, value in _input_stats(x_NK, w_N, self.kinds).items():
        module.sow(STATS, kind, value)
      return inner(module, lhs, rhs, dims, precision, preferred_element_type)
    return observed


def collect_stats(model_cfg: ModelConfig, params, batches, sites, kinds=KINDS) -> dict:
  """{path: {kind: mean over batches}} for every site; ``batches`` are global
  arrays (inside the run's mesh). Hessians are [in, in] or [L, in, in]."""
  provider = StatsProvider(frozenset(s.path for s in sites), tuple(kinds))
  total, n, _ = sum_sown(Transformer(model_cfg, provider), STATS, params, batches)
  if total is None:
    raise ValueError("calibration needs at least one batch")
  out = {}
  for s in sites:
    node = get_param(total, provider.where[s.path])
    out[s.path] = {k: node[k][0] / n for k in kinds}
  return out


# --- qwix numerics on our grid ------------------------------------------------


def qwix_how(spec: QuantSpec) -> qarray.HowToQuantize:
  """qwix's HowToQuantize for a weight in qwix's [out, in] layout, on our grid."""
  axes = {"tensor": {}, "channel": dict(channelwise_axes=(0,)),
          "group": dict(channelwise_axes=(0,), tiled_axes={1: spec.group_size})}
  kw = axes[spec.granularity]
  if spec.calibration not in ("absmax", "minmax"):
    raise ValueError(f"AWQ via qwix: weight calibration={spec.calibration!r}; use absmax "
                     "(symmetric) or minmax (asymmetric)")
  if spec.format in FP8_DTYPES:
    return qarray.HowToQuantize(qtype=FP8_DTYPES[spec.format], calibration_method="absmax", **kw)
  if spec.format != "int" or spec.stochastic_rounding:
    raise ValueError(f"AWQ via qwix: weight format={spec.format!r}"
                     f"{' with stochastic rounding' if spec.stochastic_rounding else ''}; "
                     "use int or fp8 with round-to-nearest")
  native = {8: jnp.int8, 4: jnp.int4}
  if spec.symmetric:
    qp = grid(spec)[1]
    return qarray.HowToQuantize(qtype=native.get(spec.bits, f"int{spec.bits}"),
                                calibration_method=f"absmax,{(qp + 0.5) / qp!r}", **kw)
  if spec.bits not in native:
    raise ValueError(f"AWQ via qwix: asymmetric bits={spec.bits}; qwix has zero points for "
                     "int4 and int8 only")
  return qarray.HowToQuantize(qtype=native[spec.bits], calibration_method="minmax", **kw)


# --- AWQ ---------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _awq_search(spec: QuantSpec, n_grid: int):
  how = qwix_how(spec)
  search = lambda w_ON, a_N: awq_core.search_optimal_scales(w_ON, a_N, how, n_grid)[0]
  return jax.jit(jax.vmap(search))


def quantize_awq(kernel, act_scale, spec: QuantSpec, layered: bool,
                 n_grid: int = 20) -> QuantizedWeight:
  """AWQ of a kernel [in, out] ([L, in, out]) given mean |x| per input channel:
  codes of diag(s) W and s; the input is to be divided by s (``awq_fold``)."""
  return quantize_awq_group([kernel], act_scale, spec, layered, n_grid)[0]


def quantize_awq_group(kernels, act_scale, spec: QuantSpec, layered: bool,
                       n_grid: int = 20) -> list[QuantizedWeight]:
  """AWQ of kernels that read one input (q/k/v, gate/up): one s searched on
  their output channels side by side, so that 1/s folds into the input's
  producer (AWQ, Lin et al. 2024, scales such groups together)."""
  k_LKN = jnp.concatenate([k if layered else k[None] for k in kernels], axis=-1)
  a_LK = act_scale if layered else act_scale[None]
  s_LK = _awq_search(spec, n_grid)(jnp.swapaxes(k_LKN, 1, 2).astype(jnp.float32), a_LK)
  s_LK1 = s_LK[..., None] if layered else s_LK[0, :, None]
  return [QuantizedWeight(quantize_rtn(k.astype(jnp.float32) * s_LK1, spec, layered), s_LK1)
          for k in kernels]


# --- GPTQ --------------------------------------------------------------------


def _check_gptq_spec(spec: QuantSpec, act_order: bool) -> None:
  if spec.format not in ("int", *FP8_DTYPES) or spec.learned or spec.stochastic_rounding:
    raise ValueError(f"GPTQ quantizes onto a fixed grid: weight format={spec.format!r}, "
                     f"calibration={spec.calibration!r}, stochastic_rounding="
                     f"{spec.stochastic_rounding} is not one; use int/fp8 with absmax, minmax, "
                     "percentile or mse")
  if act_order and spec.granularity == "group":
    raise ValueError("GPTQ act_order with group scales needs static groups (not "
                     "implemented); use act_order=False or a per-channel weight spec")


def _scale_of(w_RC, spec: QuantSpec):
  """Scale and zero point (float32, [R, 1] or [1, 1]) of rows of w (our calibration)."""
  gran = "tensor" if spec.granularity == "tensor" else "channel"
  qt = quantize(w_RC, dataclasses.replace(spec, granularity=gran), contract_axis=1)
  z = None if qt.zero_point is None else qt.zero_point.astype(jnp.float32)
  return qt.scale, z


def _dequant(q, s, z, dtype):
  """(q - z) * s in W's dtype (float64 in the reference test)."""
  q, s = q.astype(dtype), s.astype(dtype)
  return (q - z.astype(dtype)) * s if z is not None else q * s


# A rank-deficient Hessian (fewer independent calibration tokens than inputs,
# collinear features) is singular; in float32 the dampened H, or the inverse
# the second factorisation reads, can then be numerically indefinite and the
# Cholesky factor comes out NaN without any error. Retry with 10x the damping,
# up to this many times (1% -> 100x mean(diag H) at most).
DAMP_RETRIES = 4


def _upper_inverse_cholesky_once(H, percdamp):
  """U with U^T U = (H + damp I)^-1, damp = percdamp * mean(diag H)."""
  n = H.shape[0]
  H = H + percdamp * jnp.mean(jnp.diag(H)) * jnp.eye(n, dtype=H.dtype)
  L = jnp.linalg.cholesky(H)
  Hinv = jax.scipy.linalg.cho_solve((L, True), jnp.eye(n, dtype=H.dtype))
  return jnp.linalg.cholesky(Hinv).T


def _upper_inverse_cholesky(H, percdamp: float):
  """(U, percdamp used): the first damping of percdamp * 10^k, k <= DAMP_RETRIES,
  whose factor is finite; the percdamp used is inf when none was."""
  def retry(carry):
    _, d, k = carry
    d = d * 10.0
    return _upper_inverse_cholesky_once(H, d), d, k + 1

  def failed(carry):
    U, _, k = carry
    return ~jnp.all(jnp.isfinite(U)) & (k < DAMP_RETRIES)

  d0 = jnp.asarray(percdamp, H.dtype)
  U, d, _ = jax.lax.while_loop(failed, retry, (_upper_inverse_cholesky_once(H, d0), d0, 0))
  return U, jnp.where(jnp.all(jnp.isfinite(U)), d, jnp.inf)


class GptqResult(NamedTuple):
  """Codes (as floats) and scale/zero point in W's [R, C] layout, and the
  damping fraction the Cholesky factorisation needed (inf: none worked)."""
  q: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  percdamp: jax.Array


def gptq(W_RC, H_CC, spec: QuantSpec, *, blocksize: int = 128, percdamp: float = 0.01,
         act_order: bool = False):
  """GPTQ of W [rows=out, cols=in] under the input Hessian H [in, in].

  Returns ``GptqResult``: codes [R, C] as floats, scale [R, 1] (channel),
  [1, 1] (tensor) or [R, C / group_size] (group), zero point like the scale
  or None, and the damping used (``percdamp`` times a power of 10, see
  ``DAMP_RETRIES``; inf when H stayed non-factorable, and the codes are then
  meaningless).
  """
  R, C = W_RC.shape
  grouped = spec.granularity == "group"
  g = spec.group_size if grouped else C
  S, Z = _scale_of(W_RC, spec)  # Per channel / tensor: from the original W.
  if grouped:  # Filled at each group's first column.
    S = jnp.ones((R, C // g), S.dtype)
    Z = None if Z is None else jnp.zeros((R, C // g), Z.dtype)
  dead = jnp.diag(H_CC) == 0  # Inputs that were always 0: their weights are free.
  H_CC = jnp.where(dead & jnp.eye(C, dtype=bool), 1.0, H_CC)
  W_RC = jnp.where(dead[None, :], 0.0, W_RC)
  perm = jnp.argsort(-jnp.diag(H_CC), stable=True) if act_order else None
  if act_order:
    W_RC, H_CC = W_RC[:, perm], H_CC[perm][:, perm]
  U, percdamp = _upper_inverse_cholesky(H_CC, percdamp)
  U = jnp.where(jnp.isfinite(U), U, 0.0)  # Keeps NaN out of the loop; reported via percdamp.
  Q = jnp.zeros_like(W_RC)
  for i1 in range(0, C, blocksize):
    i2 = min(i1 + blocksize, C)
    U1 = U[i1:i2, i1:i2]

    def column(i, carry, i1=i1, U1=U1, W_stale=W_RC):
      W1, Q1, Err1, S, Z = carry
      j = i1 + i
      s, z = S[:, :1], None if Z is None else Z[:, :1]
      if grouped:  # Scale of group j // g from W as updated by earlier blocks only.
        gi, first = j // g, j % g == 0
        s_new, z_new = _scale_of(jax.lax.dynamic_slice_in_dim(W_stale, gi * g, g, axis=1), spec)
        s = jnp.where(first, s_new, jax.lax.dynamic_slice_in_dim(S, gi, 1, axis=1))
        S = jax.lax.dynamic_update_slice_in_dim(S, s, gi, axis=1)
        if Z is not None:
          z = jnp.where(first, z_new, jax.lax.dynamic_slice_in_dim(Z, gi, 1, axis=1))
          Z = jax.lax.dynamic_update_slice_in_dim(Z, z, gi, axis=1)
      w = jax.lax.dynamic_slice_in_dim(W1, i, 1, axis=1)
      q = codes(w, s, z, spec).astype(W1.dtype)
      err = (w - _dequant(q, s, z, W1.dtype)) / U1[i, i]  # Frantar et al. 2022, eq. (3)
      # U is upper triangular: the row is zero left of i, so this updates
      # columns i.. of the block only, as W1[:, i:] -= err U1[i, i:].
      W1 = W1 - err * jax.lax.dynamic_slice_in_dim(U1, i, 1, axis=0)
      Q1 = jax.lax.dynamic_update_slice_in_dim(Q1, q, i, axis=1)
      Err1 = jax.lax.dynamic_update_slice_in_dim(Err1, err, i, axis=1)
      return W1, Q1, Err1, S, Z

    W1 = W_RC[:, i1:i2]
    _, Q1, Err1, S, Z = jax.lax.fori_loop(
        0, i2 - i1, column, (W1, jnp.zeros_like(W1), jnp.zeros_like(W1), S, Z))
    Q = Q.at[:, i1:i2].set(Q1)
    W_RC = W_RC.at[:, i2:].add(-(Err1 @ U[i1:i2, i2:]))  # Lazy batch update, eq. (4)
  if act_order:
    Q = Q[:, jnp.argsort(perm)]
  return GptqResult(Q, S, Z, percdamp)


def _storage(q, spec: QuantSpec):
  if spec.format in FP8_DTYPES:
    return q.astype(FP8_DTYPES[spec.format])
  return q.astype(jnp.int8 if spec.symmetric else jnp.uint8)


@functools.lru_cache(maxsize=None)
def _gptq_layers(spec: QuantSpec, blocksize: int, percdamp: float, act_order: bool):
  fn = functools.partial(gptq, spec=spec, blocksize=blocksize, percdamp=percdamp,
                         act_order=act_order)
  return jax.jit(jax.vmap(fn))


def _check_damping(used_L, percdamp: float, path: str) -> None:
  """Fails naming the matmul when a layer's Hessian never factored; logs retries."""
  used_L = np.asarray(used_L)
  bad = np.flatnonzero(~np.isfinite(used_L))
  if bad.size:
    raise ValueError(
        f"GPTQ {path}: the Cholesky factor of the input Hessian stayed non-finite "
        f"(layer(s) {bad.tolist()}) with damping up to {percdamp * 10 ** DAMP_RETRIES:g} x "
        "mean(diag H); the calibration inputs are degenerate or non-finite: check the "
        "model's activations, use more --calib_batches or a larger --gptq_damp")
  raised = np.flatnonzero(used_L > percdamp)
  if raised.size:
    logging.warning("GPTQ %s: Hessian of layer(s) %s needed damping %s (asked %g)", path,
                    raised.tolist(), [float(used_L[i]) for i in raised], percdamp)


def quantize_gptq(kernel, hessian, spec: QuantSpec, layered: bool, *, blocksize: int = 128,
                  percdamp: float = 0.01, act_order: bool = False,
                  path: str = "matmul") -> QuantizedWeight:
  """GPTQ of a kernel [in, out] ([L, in, out]) under H [in, in] ([L, in, in]);
  ``path`` names the matmul in errors."""
  _check_gptq_spec(spec, act_order)
  k_LKN = kernel if layered else kernel[None]
  H_LKK = hessian if layered else hessian[None]
  with jax.default_matmul_precision("highest"):
    Q, S, Z, used_L = _gptq_layers(spec, blocksize, percdamp, act_order)(
        jnp.swapaxes(k_LKN, 1, 2).astype(jnp.float32), H_LKK.astype(jnp.float32))
  _check_damping(used_L, percdamp, path)
  t = lambda a: jnp.swapaxes(a, 1, 2)  # Back to the kernel layout [L, in, out].
  q = _storage(t(Q), spec)
  Z = None if Z is None else t(Z).astype(q.dtype)
  qt = QTensor(q, t(S), Z)
  return QuantizedWeight(qt if layered else QTensor(*(None if a is None else a[0] for a in qt)))


def quantize_params(method: str, params, sites, stats=None, **kw) -> dict:
  """{path: QuantizedWeight} by ``method`` (rtn | gptq | awq) at every site.
  AWQ searches one s per group of sites reading one norm (``awq_fold``)."""
  if method == "rtn":
    return quantize_params_rtn(params, sites)
  if method == "awq":
    out = {}
    for _, members in awq_fold.fold_groups(sites):
      first = members[0]
      qws = quantize_awq_group([get_param(params, m.param) for m in members],
                               stats[first.path]["act_scale"], first.spec, first.layered, **kw)
      out.update({m.path: q for m, q in zip(members, qws)})
    return out
  if method != "gptq":
    raise ValueError(f"--method={method!r}: use rtn, gptq or awq")
  return {s.path: quantize_gptq(get_param(params, s.param), stats[s.path]["hessian"], s.spec,
                                s.layered, path=s.path, **kw) for s in sites}

"""The quantized dot-general module and the provider that places it by path.

Modes (one per provider):

* ``fake``: x^ = Q_act(x), w^ = Q_w(w) with the spec's estimator (STE,
  clipped STE, LSQ, LSQ+), then ``lax.dot_general`` in the input dtype: the
  numerics of low precision on any hardware, for QAT.
* ``int8``: a real int8 x int8 -> int32 dot with the epilogue
  y = acc * s_x[token] * s_w[channel]. Its custom VJP computes, with
  ``int8_backward``, dX = dY W^T and dW = X^T dY as int8 dots too, reusing the
  forward codes (no re-quantization of X or W): the per-channel weight scale
  is moved onto dY's columns and the per-token activation scale onto dY's rows,
      dX = (dY * s_w) Q_w^T,    dW = Q_x^T (s_x * dY),
  then dY * s_w is quantized per token (row) and s_x * dY per channel (column),
  with optional stochastic rounding (rng stream "quant"). These equal the
  fake-quant STE gradients dY W^^T and X^^T dY up to dY's int8 rounding.
  Without ``int8_backward`` the two backward dots multiply dY by X^ and W^ in
  the activations' dtype (bf16 in mixed precision) accumulating in float32.
  ``DotSpec.kernels`` (``qtrain.kernels.dispatch``: "xla" default, "auto",
  "interpret") routes the three int8 dots with their scale epilogues through
  the Pallas int8 kernel, which rounds exactly as the XLA path does; the
  custom VJP is unchanged. On that path the backward's epilogue writes dX
  (and dW) in the operand's dtype, and the output carries the checkpoint
  name ``SAVED_OUT`` for remat policies (issue 16: fewer memory passes
  around the int8 dots; ``benchmarks/quant_passes.py`` counts them).
* ``fp8``: the same structure with e4m3 forward codes, e5m2 for the
  gradients and float8 dots accumulating in float32. When activations and
  weights both take one scale per tensor (``granularity="tensor"``), dY does
  too, its codes serve dX and dW alike, and each dot is written as
  ``dot(q_a, q_b) -> out dtype`` times one scalar: XLA on a GPU folds that
  scalar into cuBLASLt's fp8 GEMM (its scale operand), so no float32 product
  is written and no epilogue pass runs (1.46x the bf16 dot for y, dX and dW
  of a llama_1b MLP matmul on an H100, where per-token scales reach 1.11x:
  benchmarks/KERNEL_NOTES.md, "fp8"). With ``scale_pow2`` the scalar is a
  power of two and the fused result equals the unfused one bit for bit.
* ``none``: the high-precision dot.

``quant_dot`` is the function; ``QuantProvider`` (``qtrain.quant.provider``)
places it at matmul sites by rules, and ``QuantDotGeneral`` wraps it as a
standalone linen module.

Learned steps (LSQ, LSQ+) are params ``weight_step`` / ``act_step`` (and
``*_offset``) of the matmul's module, so they are named by module path and
nn.scan stacks them on the layer axis. Their initializers close over the
tensor the pass that creates them sees: the weight and the activations of
that batch (LSQ / LSQ+ initialisation). ``qtrain.quant.lsq_init`` creates
them from a real calibration batch and the (possibly loaded) weights; the
forward uses |s| (floored at 1e-8), so a step pushed through zero by the
optimizer keeps working with its magnitude.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from qtrain.kernels import dispatch
from qtrain.quant import calibration, estimators, quantizer
from qtrain.quant.spec import QuantSpec

MODES = ("none", "fake", "int8", "fp8")
# The checkpoint name of an int8/fp8 matmul's output. A remat policy that
# saves dot outputs (dots_with_no_batch_dims_saveable) sees XLA's int8 dot and
# keeps its int32 accumulator, but not a Pallas kernel's output: it would run
# every forward kernel whose output the backward needs again (6 of a Llama
# block's 7 under dots_no_batch). Saving this name keeps the bf16 output
# instead, for either path: no forward dot in the backward, half the bytes of
# the int32 accumulator.
SAVED_OUT = "quant_dot_out"
# The checkpoint name of an int8/fp8 matmul's operand codes and scales (the
# custom VJP's residuals Q_x, s_x, Q_w, s_w). A policy that keeps them
# (``config.model.save_quant_codes``) spares the backward a second
# quantization of X and W: the absmax reductions, the casts and whatever
# produced X (a norm) run once per step, not twice, for 1 byte per element
# of each matmul input kept until the backward. Off by default: on an H100
# the llama_1b fp8 step was no faster with it (docs/benchmarks.md).
QUANT_CODES = "quant_codes"
# Delayed scaling (``DotSpec.amax_history`` > 0): the linen collection and
# variable holding one site's absmax history, float32 [3, H] (rows: the
# activations, the weight, the output gradient; column 0 the newest step),
# stacked [L, 3, H] under nn.scan. See ``qtrain.quant.delayed``.
AMAX = "fp8_amax"
AMAX_VAR = "history"
AMAX_ROWS = ("act", "weight", "grad")


def mode_problem(spec: QuantSpec, mode: str) -> tuple[str, str] | None:
  """(field, message) when ``mode`` cannot run ``spec``; None when it can."""
  if mode in ("int8", "fp8"):
    if spec.granularity == "group":
      return "granularity", f"mode={mode!r} scales whole rows/columns: use tensor, channel or token"
    if spec.learned or spec.estimator == "lsq":
      return "calibration", f"learned steps run in mode='fake' only (mode={mode!r})"
    if spec.stochastic_rounding:
      return "stochastic_rounding", ("forward stochastic rounding runs in mode='fake'; for "
                                     "the gradients set config.quant.grad_stochastic_rounding")
  if mode == "int8":
    if spec.format not in ("int", "ternary") or not spec.symmetric:
      return "format", "mode='int8' multiplies symmetric int codes: format int/ternary, symmetric"
  if mode == "fp8" and spec.format != "fp8_e4m3":
    return "format", "mode='fp8' runs e4m3 forward operands (e5m2 gradients): format='fp8_e4m3'"
  return None


@dataclasses.dataclass(frozen=True)
class _Lowp:
  """Static config of the low-precision matmul (hashable: a nondiff arg)."""
  act: QuantSpec
  weight: QuantSpec
  grad: QuantSpec | None  # dY's quantizer; None: float32 backward on X^, W^.
  acc_dtype: Any  # int32 for int codes, float32 for fp8.
  x_dtype: Any
  w_dtype: Any
  out_dtype: Any  # preferred_element_type, else the activations' dtype.
  kernels: str = "xla"  # int8 dots: qtrain.kernels.dispatch's switch.
  tensorwise: bool = False  # DotSpec.fp8_per_tensor: each dot one scaled fp8 GEMM.
  # With an amax history (lowp_matmul's ``hist``): scale X, W and dY from it
  # (True) or from their own absmax (False: the seeding pass); either way the
  # backward hands this step's three absmaxes back as hist's cotangent.
  delayed: bool = True


_NN = (((1,), (0,)), ((), ()))  # [M, K] x [K, N]
_NT = (((1,), (1,)), ((), ()))  # [M, N] x [K, N] -> [M, K]
_TN = (((0,), (0,)), ((), ()))  # [M, K] x [M, N] -> [K, N]


def _inside(x, qt, spec):
  """Clipped STE mask (None for plain STE)."""
  if spec.estimator != "clipped_ste":
    return None
  lo, hi = quantizer.representable_range(qt, spec, x.shape)
  return (x >= lo) & (x <= hi)


def _scaled_int8(cfg: _Lowp, x, w, s_x, s_w, out_dtype, x_t=False, w_t=False):
  """(x w) * s_x * s_w on int8 codes through the dispatcher; scales are
  [rows, 1] / [1, cols] (or [1, 1]) arrays, None meaning 1 (a product by
  1.0 is exact, so the kernel's two-sided epilogue rounds as one side)."""
  m = x.shape[1] if x_t else x.shape[0]
  n = w.shape[0] if w_t else w.shape[1]
  vec = lambda s, d: jnp.ones((d,), jnp.float32) if s is None else jnp.broadcast_to(
      s.astype(jnp.float32).reshape(-1), (d,))
  return dispatch.int8_dot(x, w, vec(s_x, m), vec(s_w, n), out_dtype=out_dtype,
                           kernels=cfg.kernels, x_transposed=x_t, w_transposed=w_t)


def _scaled_fp8(a, b, s_a, s_b, dims, out_dtype):
  """dot(a, b) * s_a * s_b for float8 codes and scalar scales, in the form
  XLA's GPU gemm rewriter fuses: the float8 dot straight to ``out_dtype``,
  then one scalar product, which becomes the GEMM's scale operand."""
  y = jax.lax.dot_general(a, b, dims, preferred_element_type=out_dtype)
  return y * (s_a * s_b).reshape(()).astype(out_dtype)


def _residual(qt: quantizer.QTensor) -> quantizer.QTensor:
  """``qt`` as the custom VJP saves it: codes and scale named QUANT_CODES for
  remat policies, float8 codes as their uint8 bit patterns. A residual that
  remat keeps gets ``reduce_precision(x, finfo(x.dtype))`` from JAX
  (jax._src.ad_checkpoint._insert_reduce_precision), which has IEEE
  semantics: for float8_e4m3fn (no infinities, largest 448) it turns codes
  above 240 into inf and flushes its subnormals, so saved e4m3 codes came back
  wrong (measured: a NaN loss, jax 0.10.2 on CPU). An integer view gets no
  such op and is a free bitcast."""
  q = qt.q
  if jnp.issubdtype(q.dtype, jnp.floating):
    q = jax.lax.bitcast_convert_type(q, jnp.uint8)
  return qt._replace(q=checkpoint_name(q, QUANT_CODES),
                     scale=checkpoint_name(qt.scale, QUANT_CODES))


def _codes(qt: quantizer.QTensor, spec: QuantSpec) -> quantizer.QTensor:
  """A residual of ``_residual`` back as ``spec``'s codes."""
  if qt.q.dtype == jnp.uint8 and spec.format in quantizer.FP8_DTYPES:
    return qt._replace(q=jax.lax.bitcast_convert_type(qt.q, quantizer.FP8_DTYPES[spec.format]))
  return qt


def _both_layouts(x_MN, spec: QuantSpec, kernels: str, history=None, delayed: bool = True):
  """(codes [M, N], codes [N, M]) of x under a per-tensor fp8 ``spec``, cast
  once (``qtrain.kernels.dispatch.fp8_both_layouts``: the cast+transpose
  kernel under ``kernels='auto'`` on a GPU), both QTensors with the one scale.
  cuBLASLt's fp8 GEMM reads both operands contraction-major, so dW = X^T dY
  reads X's and dY's codes [K, M] and [N, M]: through XLA a cast, then a
  transpose of the 1-byte codes as a pass of its own.

  With ``history`` (x's row of an amax history, [H]) also x's absmax, read
  by the cast's pass, as a third value; ``delayed``: the scale is that of
  the history's largest absmax (values beyond it saturate at the format's
  largest code), not of x's own."""
  scale = (quantizer.scale_of_amax(jnp.max(history), spec)
           if history is not None and delayed else quantizer.scale_of(x_MN, spec))
  q, q_t, *amax = dispatch.fp8_both_layouts(x_MN, scale, quantizer.FP8_DTYPES[spec.format],
                                            pow2=spec.scale_pow2, kernels=kernels,
                                            amax=history is not None)
  return quantizer.QTensor(q, scale, None), quantizer.QTensor(q_t, scale, None), *amax


def _lowp_fwd(x_MK, w_KN, rng, hist, cfg: _Lowp):
  # The codes feed low-precision dots only, unless the backward dequantizes
  # them (high-precision backward): then the cast may not be the rounding.
  only_dots = cfg.grad is not None
  if cfg.tensorwise and only_dots:
    # The forward reads W's codes as [N, K], the backward X's as [K, M] and
    # W's as [K, N]: each of X and W cast once, in both layouts.
    # Delayed scaling: hist's rows give the scales, the casts the new absmaxes.
    row = lambda i: None if hist is None else hist[i]
    qx, qx_KM, *a_x = _both_layouts(x_MK, cfg.act, cfg.kernels, row(0), cfg.delayed)
    qw, qw_NK, *a_w = _both_layouts(w_KN, cfg.weight, cfg.kernels, row(1), cfg.delayed)
    amaxes = None if hist is None else (*a_x, *a_w, hist)
    masks = (_inside(x_MK, qx, cfg.act), _inside(w_KN, qw, cfg.weight))
    y_MN = _scaled_fp8(qx.q, qw_NK.q, qx.scale, qw.scale, _NT, cfg.out_dtype)
    return y_MN, (_residual(qx_KM), _residual(qw), masks, rng, amaxes)
  if hist is not None:
    raise ValueError("an amax history (delayed scaling) needs per-tensor fp8 operands with "
                     "low-precision backward dots")
  qx = quantizer.quantize(x_MK, cfg.act, contract_axis=1,
                          cast_rounds=only_dots)  # scale [M, 1] or [1, 1]
  qw = quantizer.quantize(w_KN, cfg.weight, contract_axis=0,
                          cast_rounds=only_dots)  # scale [1, N] or [1, 1]
  masks = (_inside(x_MK, qx, cfg.act), _inside(w_KN, qw, cfg.weight))
  res = (_residual(qx), _residual(qw), masks, rng, None)
  if cfg.tensorwise:
    return _scaled_fp8(qx.q, qw.q, qx.scale, qw.scale, _NN, cfg.out_dtype), res
  if cfg.acc_dtype == jnp.int32 and cfg.kernels != "xla":
    return _scaled_int8(cfg, qx.q, qw.q, qx.scale, qw.scale, cfg.out_dtype), res
  acc_MN = jax.lax.dot_general(qx.q, qw.q, _NN, preferred_element_type=cfg.acc_dtype)
  y_MN = acc_MN.astype(jnp.float32) * qx.scale * qw.scale
  return y_MN.astype(cfg.out_dtype), res


def _lowp_bwd(cfg: _Lowp, res, g_MN):
  qx, qw, (mask_x, mask_w), rng, amaxes = res
  d_hist = None
  qx, qw = _codes(qx, cfg.act), _codes(qw, cfg.weight)
  g_in, g_MN = g_MN, g_MN.astype(jnp.float32)  # g_in: what a kernel reads (bf16).
  if cfg.grad is None:  # High-precision backward: the compute dtype, float32 accumulation.
    g_lo = g_MN.astype(cfg.x_dtype)
    dx = jax.lax.dot_general(g_lo, quantizer.dequantize(qw, cfg.x_dtype), _NT,
                             preferred_element_type=jnp.float32)
    dw = jax.lax.dot_general(quantizer.dequantize(qx, cfg.x_dtype), g_lo, _TN,
                             preferred_element_type=jnp.float32)
  elif cfg.tensorwise:  # One scale for dY: its codes serve both dots.
    hist = None if amaxes is None else amaxes[2]
    qg, qg_NM, *a_g = _both_layouts(g_in, cfg.grad, cfg.kernels,
                                    None if hist is None else hist[2], cfg.delayed)
    if hist is not None:  # hist's "gradient": this step's absmaxes in column 0 (delayed.py).
      d_hist = jnp.zeros_like(hist).at[:, 0].set(jnp.stack([*amaxes[:2], *a_g]))
    out_x = cfg.x_dtype if mask_x is None else jnp.float32
    out_w = cfg.w_dtype if mask_w is None else jnp.float32
    dx = _scaled_fp8(qg.q, qw.q, qg.scale, qw.scale, _NT, out_x)
    # qx is X's codes as [K, M] (_lowp_fwd): dW = (Q_x^T)(Q_g^T)^T, both contraction-major.
    dw = _scaled_fp8(qx.q, qg_NM.q, qx.scale, qg.scale, _NT, out_w)
  else:
    r_x, r_w = jax.random.split(rng) if rng is not None else (None, None)
    # Move s_w onto dY's columns, quantize per row: dX = s_gx * (Q_gx Q_w^T).
    gx = quantizer.quantize(g_MN * qw.scale, cfg.grad, contract_axis=1, rng=r_x,
                            cast_rounds=True)
    # Move s_x onto dY's rows, quantize per column: dW = (Q_x^T Q_gw) * s_gw.
    # The kernel reads Q_gw as [N, M] (s8 wgmma is contraction-major only);
    # XLA writes it so in the pass that quantizes (the transpose fuses into
    # the cast: benchmarks/quant_passes.py), so no [N, M] layout here.
    gw = quantizer.quantize(g_MN * qx.scale, cfg.grad, contract_axis=0, rng=r_w,
                            cast_rounds=True)
    if cfg.acc_dtype == jnp.int32 and cfg.kernels != "xla":
      # Without a clipped-STE mask the epilogue writes dX / dW in the
      # operand's dtype: its one rounding of the float32 product is the cast
      # below, so the float32 [M, K] write and re-read go (bit-identical).
      dx = _scaled_int8(cfg, gx.q, qw.q, gx.scale, None,
                        cfg.x_dtype if mask_x is None else jnp.float32, w_t=True)
      dw = _scaled_int8(cfg, qx.q, gw.q, None, gw.scale,
                        cfg.w_dtype if mask_w is None else jnp.float32, x_t=True)
    else:
      dx = jax.lax.dot_general(gx.q, qw.q, _NT, preferred_element_type=cfg.acc_dtype)
      dx = dx.astype(jnp.float32) * gx.scale
      dw = jax.lax.dot_general(qx.q, gw.q, _TN, preferred_element_type=cfg.acc_dtype)
      dw = dw.astype(jnp.float32) * gw.scale
  if mask_x is not None:
    dx = jnp.where(mask_x, dx, 0.0)
  if mask_w is not None:
    dw = jnp.where(mask_w, dw, 0.0)
  return dx.astype(cfg.x_dtype), dw.astype(cfg.w_dtype), None, d_hist


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lowp_matmul(x_MK, w_KN, rng, hist, cfg: _Lowp):
  """y = X^ W^ computed on int8 (or fp8) codes; see the module doc for the
  VJP. ``hist``: None, or the site's amax history [3, H] (delayed scaling,
  per-tensor fp8 only), whose cotangent is this step's absmaxes."""
  return _lowp_fwd(x_MK, w_KN, rng, hist, cfg)[0]


lowp_matmul.defvjp(_lowp_fwd, _lowp_bwd)


def _grad_spec(spec: "DotSpec", stochastic: bool) -> QuantSpec:
  """dY's quantizer: per row for dX, per column for dW (each reduced over its
  backward dot's contraction axis); for fp8 with per-tensor operands, one
  scale for dY too, a power of two where the activations' is."""
  fmt = "fp8_e5m2" if spec.mode == "fp8" else "int"
  tensor = spec.fp8_per_tensor
  return QuantSpec(bits=8, format=fmt, granularity="tensor" if tensor else "token",
                   calibration="absmax", stochastic_rounding=stochastic,
                   scale_pow2=tensor and spec.act.scale_pow2)


@dataclasses.dataclass(frozen=True)
class DotSpec:
  """What one matmul's quantizer does (hashable: chosen per site at trace time)."""
  weight: QuantSpec | None = None
  act: QuantSpec | None = None
  mode: str = "fake"
  int8_backward: bool = True  # int8/fp8: low-precision dX and dW dots.
  grad_stochastic_rounding: bool = False  # int8 backward: SR of dY (rng "quant").
  kernels: str = "xla"  # int8 mode: "xla" | "auto" | "interpret" (qtrain.kernels.dispatch).
  # Per-tensor fp8: > 0 keeps an amax history of this many steps per site
  # and scales from it (delayed scaling, qtrain.quant.delayed) where the
  # model is applied with the AMAX collection; without it, current scaling.
  amax_history: int = 0
  amax_seed: bool = False  # Record absmaxes but scale from the current ones (the seeding pass).

  @property
  def quantizes(self) -> bool:
    return self.mode != "none" and (self.weight is not None or self.act is not None)

  @property
  def fp8_per_tensor(self) -> bool:
    """fp8 with one scale per operand: each dot is one scaled cuBLASLt GEMM."""
    return (self.mode == "fp8" and self.act.granularity == "tensor"
            and self.weight.granularity == "tensor")


def quant_dot(spec: DotSpec, inner, module, lhs, rhs, dimension_numbers, precision=None,
              preferred_element_type=None, *, rng=None, amax_name: str = AMAX_VAR):
  """``inner(module, lhs, rhs, ...)`` on quantized operands (lhs the
  activations, rhs the weight); modes int8/fp8 replace ``inner`` by the
  low-precision matmul. ``module`` owns learned steps and the amax history
  (variable ``amax_name``; a joined projection's dot names it by its parts)
  and, unless ``rng`` is given, draws the stochastic-rounding key from its
  "quant" stream."""
  (lc, rc), (lb, rb) = dimension_numbers
  if lb or rb or len(lc) != 1:
    raise ValueError(f"quantized matmuls take one contraction and no batch dims, "
                     f"got {dimension_numbers}")
  lhs_axis, rhs_axis = lc[0] % lhs.ndim, rc[0] % rhs.ndim
  if not spec.quantizes:
    return inner(module, lhs, rhs, dimension_numbers, precision, preferred_element_type)
  if needs_rng(spec) and rng is None:
    rng = quant_rng(module)
  if spec.mode == "fake":
    x = _fake(module, lhs, spec.act, "act", lhs_axis, rng)
    w = _fake(module, rhs, spec.weight, "weight", rhs_axis, rng)
    return inner(module, x, w, dimension_numbers, precision, preferred_element_type)
  return _lowp(spec, lhs, rhs, lhs_axis, rhs_axis, preferred_element_type, rng,
               _amax_history(module, spec, amax_name))


def _amax_history(module, spec: DotSpec, name: str):
  """The site's amax history [3, H] where it keeps one and the model is
  applied with the AMAX collection (or initialised: zeros); else None, and
  the matmul scales from the current absmaxes (evaluation, PTQ, export)."""
  if not (spec.amax_history and spec.fp8_per_tensor):
    return None
  if not (module.is_initializing() or module.has_variable(AMAX, name)):
    return None
  return module.variable(AMAX, name, jnp.zeros, (len(AMAX_ROWS), spec.amax_history),
                         jnp.float32).value


def needs_rng(spec: DotSpec) -> bool:
  if not spec.quantizes:
    return False
  if spec.mode == "fake":
    return any(q is not None and q.stochastic_rounding for q in (spec.act, spec.weight))
  return spec.grad_stochastic_rounding and spec.int8_backward


def _fake(module, x, spec, role, axis, rng):
  if spec is None:
    return x
  if spec.learned:
    return _learned(module, x, spec, role, axis)
  if spec.stochastic_rounding:  # Independent draws for the two operands.
    rng = jax.random.fold_in(rng, 0 if role == "act" else 1)
  else:
    rng = None
  return estimators.fake_quant_ste(x, spec, contract_axis=axis, rng=rng)


def quant_rng(module):
  if not (module.has_rng("quant") or module.is_initializing()):  # init: falls back to "params".
    raise ValueError("stochastic rounding draws from the 'quant' rng stream: call "
                     "model.apply(..., rngs={'quant': key}) with a fresh key per step")
  return module.make_rng("quant")


def _learned(module, x, spec, role, axis):
  """LSQ / LSQ+ with the step (and offset) as params initialised from x."""
  qn, qp = quantizer.grid(spec)
  axes = None if spec.granularity == "tensor" else axis
  x0 = jax.lax.stop_gradient(x)
  if spec.calibration == "lsq":
    step = module.param(f"{role}_step", lambda _: calibration.lsq_init_step(x0, qp, axes))
  else:
    init_both = lambda: calibration.lsq_plus_init(x0, qn, qp, axes)
    step = module.param(f"{role}_step", lambda _: init_both()[0])
    offset = module.param(f"{role}_offset", lambda _: init_both()[1])
  step = jnp.maximum(jnp.abs(step), 1e-8)  # Only the magnitude is a step.
  # N: values sharing one step (weights); features per token (activations).
  n = x.size // step.size if role == "weight" else x.shape[axis]
  g = estimators.lsq_grad_scale(n, qp)
  if spec.calibration == "lsq":
    return estimators.lsq(x, step, qn, qp, g)
  return estimators.lsq_plus(x, step, offset, qn, qp, g)


def _lowp(spec: DotSpec, lhs, rhs, lhs_axis, rhs_axis, preferred_element_type, rng, hist=None):
  for role, q in (("act", spec.act), ("weight", spec.weight)):
    if q is None:
      raise ValueError(f"mode={spec.mode!r} multiplies two quantized operands: set {role}")
    problem = mode_problem(q, spec.mode)
    if problem:
      raise ValueError(f"quantized matmul {role}.{problem[0]}: {problem[1]}")
  x = jnp.moveaxis(lhs, lhs_axis, -1)
  w = jnp.moveaxis(rhs, rhs_axis, 0)
  out_shape = x.shape[:-1] + w.shape[1:]
  sr = spec.grad_stochastic_rounding and spec.int8_backward
  cfg = _Lowp(act=spec.act, weight=spec.weight,
              grad=_grad_spec(spec, sr) if spec.int8_backward else None,
              acc_dtype=jnp.int32 if spec.mode == "int8" else jnp.float32,
              x_dtype=lhs.dtype, w_dtype=rhs.dtype,
              out_dtype=preferred_element_type or lhs.dtype, kernels=spec.kernels,
              tensorwise=spec.fp8_per_tensor, delayed=not spec.amax_seed)
  y = lowp_matmul(x.reshape(-1, x.shape[-1]), w.reshape(w.shape[0], -1), rng, hist, cfg)
  return checkpoint_name(y, SAVED_OUT).reshape(out_shape)


def _xla(module, lhs, rhs, dimension_numbers, precision, preferred_element_type):
  del module
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


class QuantDotGeneral(nn.Module):
  """``quant_dot`` as a standalone module: ``lax.dot_general(lhs, rhs, ...)``
  with lhs the activations (``act``) and rhs the weight (``weight``)."""
  weight: QuantSpec | None = None
  act: QuantSpec | None = None
  mode: str = "fake"
  int8_backward: bool = True
  grad_stochastic_rounding: bool = False

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    spec = DotSpec(self.weight, self.act, self.mode, self.int8_backward,
                   self.grad_stochastic_rounding)
    return quant_dot(spec, _xla, self, lhs, rhs, dimension_numbers, precision,
                     preferred_element_type)

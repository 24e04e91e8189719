"""What one quantizer does: a frozen, documented spec, validated before tracing.

A ``QuantSpec`` names the number format, the grid, where scales are shared
(granularity), how the range is found (calibration) and how gradients cross
the rounding (estimator). The same spec serves weights, activations, KV and
gradients; ``role`` tells ``validate`` which combinations make sense there.

Errors name the config field and the fix, e.g.
``config.quant.rules[2].weight.bits=1: bits must be in 2..8``.
"""

from __future__ import annotations

import dataclasses

FORMATS = ("int", "fp8_e4m3", "fp8_e5m2", "ternary")
GRANULARITIES = ("tensor", "channel", "token", "group")
CALIBRATIONS = ("absmax", "minmax", "percentile", "mse", "lsq", "lsq_plus")
LEARNED_CALIBRATIONS = ("lsq", "lsq_plus")
ESTIMATORS = ("ste", "clipped_ste", "lsq")
ROLES = ("weight", "act", "kv", "grad")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """One quantizer. Hashable, so it can sit in a linen Module's fields."""
  # Bits per code, 2..8. int: 2^bits levels (symmetric drops the most negative
  # one); fp8 formats need 8; ternary needs 2 (three levels stored in 2 bits).
  bits: int = 8
  # "int": uniform integer grid; "fp8_e4m3" / "fp8_e5m2": a scaled float8
  # cast (OCP FP8, e4m3fn has no inf); "ternary": {-1, 0, 1} * scale (TWN).
  format: str = "int"
  # True: grid [-(2^(b-1)-1), 2^(b-1)-1], zero at code 0. False: grid
  # [0, 2^b-1] with an integer zero point (int only; LSQ+ learns the offset).
  symmetric: bool = True
  # Where one scale is shared. "tensor": one scale. "channel": one per output
  # column of a weight (reduce over the contraction dim). "token": one per row
  # of activations (reduce over the contraction dim, i.e. features).
  # "group": one per `group_size` consecutive elements of the contraction dim.
  granularity: str = "channel"
  # Elements per scale along the contraction dim; used by "group" only; must
  # divide that dim (checked where the dim is known).
  group_size: int = 128
  # How the clipping range is found. absmax: max|x|; minmax: [min, max];
  # percentile: the `percentile`-th percentile of |x| (or both tails);
  # mse: the ratio of `mse_grid` times absmax/minmax minimising ||x - fq(x)||^2;
  # lsq / lsq_plus: a learned step (and offset), Esser 2020 / Bhalgat 2020.
  calibration: str = "absmax"
  # Percentile in (0, 100] for calibration="percentile".
  percentile: float = 99.9
  # Clipping ratios (each in (0, 1]) searched by calibration="mse".
  mse_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
  # Gradient through the rounding. ste: identity; clipped_ste: identity inside
  # the representable range, 0 outside; lsq: LSQ/LSQ+ (needs learned calibration).
  estimator: str = "ste"
  # Round v to floor(v + u), u ~ U[0, 1): unbiased, E[q] = v (int format only).
  stochastic_rounding: bool = False
  # Round each scale up to a power of two (symmetric, calibrated scales): exact
  # in any dtype, so fp8 dots fold it into cuBLASLt's GEMM bit-for-bit.
  scale_pow2: bool = False

  @property
  def learned(self) -> bool:
    return self.calibration in LEARNED_CALIBRATIONS

  def validate(self, where: str, *, role: str | None = None,
               dim: int | None = None) -> "QuantSpec":
    """Raises ValueError naming ``where.<field>``; returns self when valid.

    ``dim``: the contraction dim this spec will quantize along, when known.
    """
    for problem in _problems(self, role, dim):
      field, msg = problem
      raise ValueError(f"{where}.{field}={getattr(self, field)!r}: {msg}")
    return self


def _choice_problems(s: QuantSpec):
  for field, options in (("format", FORMATS), ("granularity", GRANULARITIES),
                         ("calibration", CALIBRATIONS), ("estimator", ESTIMATORS)):
    if getattr(s, field) not in options:
      yield field, f"use one of {options}"
  if not isinstance(s.bits, int) or not 2 <= s.bits <= 8:
    yield "bits", "bits must be in 2..8"


def _format_problems(s: QuantSpec):
  if s.format.startswith("fp8"):
    if s.bits != 8:
      yield "bits", f"format {s.format} is 8 bits wide; set bits=8"
    if not s.symmetric:
      yield "symmetric", f"format {s.format} is sign-magnitude; set symmetric=True"
    if s.calibration in ("minmax", "lsq", "lsq_plus"):
      yield "calibration", "fp8 uses one positive scale: use absmax, percentile or mse"
  if s.format == "ternary":
    if not s.symmetric:
      yield "symmetric", "ternary {-1, 0, 1} is symmetric; set symmetric=True"
    if s.bits != 2:
      yield "bits", "ternary codes are stored in 2 bits; set bits=2"
    if s.calibration != "absmax":
      yield "calibration", ("ternary scale and threshold are TWN's closed form "
                            "(Li et al. 2016); leave calibration='absmax'")
  if s.stochastic_rounding and s.format != "int":
    yield "stochastic_rounding", "stochastic rounding is implemented for format='int' only"


def _calibration_problems(s: QuantSpec):
  if s.estimator == "lsq" and not s.learned:
    yield "estimator", "lsq learns a step: set calibration to 'lsq' or 'lsq_plus'"
  if s.learned and s.estimator != "lsq":
    yield "estimator", f"calibration={s.calibration!r} learns its step only with estimator='lsq'"
  if s.learned and s.format != "int":
    yield "format", "learned steps (lsq, lsq_plus) are for format='int'"
  if s.calibration == "lsq" and not s.symmetric:
    yield "symmetric", "lsq learns a step only; for an offset use calibration='lsq_plus'"
  if s.calibration == "lsq_plus" and s.symmetric:
    yield "symmetric", "lsq_plus learns an offset: set symmetric=False"
  if s.learned and s.granularity in ("token", "group"):
    yield "granularity", "a learned step is per tensor or per channel"
  if s.calibration == "percentile" and not 0 < s.percentile <= 100:
    yield "percentile", "percentile must be in (0, 100]"
  if s.scale_pow2 and (s.learned or not s.symmetric or s.format == "ternary"):
    yield "scale_pow2", ("rounds a calibrated symmetric scale (format int or fp8); "
                         "learned, asymmetric and ternary scales keep their own")
  if s.calibration == "mse" and (not s.mse_grid or not all(0 < r <= 1 for r in s.mse_grid)):
    yield "mse_grid", "give one or more clipping ratios in (0, 1]"


def _role_problems(s: QuantSpec, role: str | None, dim: int | None):
  if role == "weight" and s.granularity == "token":
    yield "granularity", "weights have no tokens: use tensor, channel or group"
  if role in ("act", "kv", "grad") and s.granularity == "channel":
    yield "granularity", (f"a per-channel {role} scale would sit on the contraction dim; "
                          "use token (one scale per row), tensor or group")
  if s.granularity == "group":
    if s.group_size <= 0:
      yield "group_size", "group_size must be > 0"
    elif dim is not None and dim % s.group_size:
      divisors = [g for g in (16, 32, 64, 128, 256) if dim % g == 0]
      yield "group_size", (f"does not divide the contraction dim {dim}; "
                           f"use a divisor of {dim}, e.g. {divisors or [dim]}")


def _problems(s: QuantSpec, role: str | None, dim: int | None):
  yield from _choice_problems(s)
  yield from _format_problems(s)
  yield from _calibration_problems(s)
  yield from _role_problems(s, role, dim)

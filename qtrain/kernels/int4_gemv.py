"""W4A16 at decode sizes (M <= 16): stream the packed int4 weight once.

    y[m, n] = sum_g s[g, n] * sum_{k in group g} x[m, k] q[k, n]

the product of ``int4.int4_matmul`` (same "halves" packing: ``packed[i, n]``
holds q[i, n] in its low nibble and q[i + K/2, n] in its high one; float32
group scales [K/g, N]), built for the regime where it is bound by reading
the weight: at M <= 16 the K N / 2 packed bytes are all the work (8b gate_up:
29 MB, ~10 us at 3 TB/s, against the bf16 dot's 117 MB; issue 16's target is
2.5x XLA's bf16 dot there). What this kernel does differently from
``int4_matmul``'s split-K tiles (1.17x at M = 16 in KERNEL_NOTES' first run):

* No glue around the call. M is padded to 16 inside the kernel (x's rows
  >= M load as zeros through a mask, output rows >= M are never stored), N
  is masked the same way when the tile does not divide it; nothing is
  padded, sliced or cast in XLA, so the call is one kernel (two with
  split-K: XLA sums the float32 partials and casts in one fusion). At
  M = 16 and tiles that divide N, no mask is emitted at all.
* Integer-free unpacking. A nibble n (two's complement code c) becomes the
  bf16 136 + c by setting it under a bf16 exponent: (n ^ 0x4308) as int16
  bit pattern is 0x4300 | (c + 8), i.e. 128 + c + 8, exactly; subtracting
  136 leaves c (exact, |c| <= 8). A bit operation and a subtraction per
  code instead of an int -> float conversion, which Hopper issues at a
  quarter of the FP32 rate (16 per SM per clock): 59 M conversions for 8b
  gate_up would take ~16 us alone, over the byte floor. ``unpack="shift"``
  keeps ``int4_matmul``'s shifts + conversion, to measure the difference.
* Wide tiles over N: ``bn`` >= 128 columns make each packed row a 128-byte
  run (16-byte loads, whole sectors); split-K spreads the group pairs so
  that >= ``per_sm`` programs per SM of an H100 are in flight.
* ``swap``: the dot runs as y^T = W^T x^T, the dequantized weight tile as
  the left operand (the wide M side of the tensor-core tile, 16 x columns of
  x on the narrow side) instead of padding x's 16 rows up to the MMA's M.
  Which orientation Triton lowers better for a register-produced operand is
  a GPU question; the benchmark times both.

Each group's partial sum is scaled once (on the [16, bn] partial, not per
weight element), as in ``int4_matmul``: the numerics are that kernel's, the
same bf16 products (exact: bf16 x times integers |q| <= 8) summed in
float32, so the result differs from ``int4_matmul_xla`` by float32
summation order only.

Two layouts of the codes: the halves layout [K/2, N] that ``pack_int4`` and
the exports write, and the tiled one, ``tile_codes(codes, bn)``: the same
bytes as [N/bn, K/2, bn], one column tile's K/2 rows contiguous, so each
program streams one contiguous run instead of K/2 runs of bn bytes N bytes
apart. On the H100 the tiled layout with bn = 64 ran the 8b decode shapes
at 1.66-1.98x XLA's bf16 dot by kernel time, where the halves layout's best
config ran 1.43-1.56x in the same process (benchmarks/KERNEL_NOTES.md, "v3").
``int4_gemv`` takes either; a tiled weight fixes ``GemvConfig.bn`` to its
tile width.

Shapes: M <= 16 (larger M: ``int4_matmul``), K a multiple of 2 * group, any
N (masked; tiled: N = tiles x bn, no mask). Not routed by ``qtrain.kernels.dispatch``: on the H100 no config
beat v1 (``int4_matmul``) on every decode shape (benchmarks/KERNEL_NOTES.md,
"v2 measured"); ``benchmarks/matmul.py --decode`` times it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qtrain.kernels.int4 import _check
from qtrain.kernels.int8 import with_poison

MAX_M = 16  # One tensor-core tile of rows; tl.dot's smallest side.
SMS = 132  # An H100's; split-K aims at ``GemvConfig.per_sm`` programs on each.
UNPACKS = ("magic", "shift")


@dataclasses.dataclass(frozen=True)
class GemvConfig:
  """One program per (bn columns, K / split_k rows) of the weight.

  bn: output columns per program (packed bytes per row run), a power of two
  >= 16. split_k: programs per column tile, each summing hg / split_k group
  pairs into its own float32 partial (0: ``split_for``'s rule: >= per_sm
  programs per SM, the partials' bytes under an eighth of the packed
  weight's). swap: the weight tile is the dot's left operand (see the module doc).
  unpack: "magic" (bf16 exponent trick) or "shift" (shifts + int -> bf16
  conversion).
  """
  bn: int = 128
  split_k: int = 0
  num_warps: int = 4
  num_stages: int = 3
  swap: bool = False
  unpack: str = "magic"
  per_sm: int = 4


DEFAULT = GemvConfig()


def split_for(m: int, k: int, n_tiles: int, half_groups: int, split_k: int = 0,
              per_sm: int = 4) -> int:
  """The split a call runs, always a divisor of the group pairs (a split
  never pads K): ``split_k`` cut down to one; for 0 the smallest reaching
  ``per_sm`` programs per SM, but at most K / (128 M): the float32 partials,
  written and read back (8 bytes per split per output element), stay under
  an eighth of the packed bytes (K / 2 per column). At M = 16 that allows
  2 splits at K = 4096, 7 at K = 14336; at M = 1, 32."""
  divisors = [d for d in range(1, half_groups + 1) if half_groups % d == 0]
  if split_k:
    return max(d for d in divisors if d <= split_k)
  cap = max(1, k // (128 * m))
  fits = [d for d in divisors if d <= cap]
  return next((d for d in fits if n_tiles * d >= per_sm * SMS), fits[-1])


def tile_codes(packed, bn: int):
  """Halves-layout codes [K/2, N] -> the tiled layout [N/bn, K/2, bn] (a copy)."""
  kh, n = packed.shape
  if n % bn:
    raise ValueError(f"tile_codes: N={n} must be a multiple of the tile width bn={bn}")
  return packed.reshape(kh, n // bn, bn).transpose(1, 0, 2)


def untile_codes(tiled):
  """The tiled layout [N/bn, K/2, bn] -> halves-layout codes [K/2, N]."""
  nt, kh, bn = tiled.shape
  return tiled.transpose(1, 0, 2).reshape(kh, nt * bn)


def unpack_bf16(p, unpack: str = "magic"):
  """packed int8 [r, c] -> (low-nibble codes, high-nibble codes) as bf16."""
  if unpack == "shift":
    lo = jax.lax.shift_right_arithmetic(jax.lax.shift_left(p, jnp.int8(4)), jnp.int8(4))
    return lo.astype(jnp.bfloat16), jax.lax.shift_right_arithmetic(p, jnp.int8(4)).astype(jnp.bfloat16)
  u = p.astype(jnp.int16)  # Sign-extended; the masks below take the nibbles either way.
  # n ^ 0x4308 = 0x4300 | (n ^ 8): the bf16 128 + (c + 8) for the two's complement code c.
  magic = lambda nib: jax.lax.bitcast_convert_type(nib ^ jnp.int16(0x4308), jnp.bfloat16)
  bias = jnp.bfloat16(136)
  lo = magic(u & jnp.int16(0xF)) - bias
  hi = magic(jax.lax.shift_right_arithmetic(u, jnp.int16(4)) & jnp.int16(0xF)) - bias
  return lo, hi


def _kernel(x_ref, p_ref, s_ref, o_ref, *, m: int, n: int, group: int, half_groups: int,
            steps: int, cfg: GemvConfig):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  bn = o_ref.shape[-1]
  j0 = pl.program_id(1) * steps  # This program's first group pair (split-K).
  rows_ok = (jax.lax.broadcasted_iota(jnp.int32, (MAX_M, group), 0) < m) if m < MAX_M else None
  cols = pl.program_id(0) * bn + jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)
  cols_ok = cols < n if n % bn else None

  def load_x(j):  # x's [16, group] slice of group j; rows >= M read as zeros.
    ref = x_ref.at[:, pl.ds(pl.multiple_of(j * group, group), group)]
    return ref[...] if rows_ok is None else plgpu.load(ref, mask=rows_ok, other=0)

  def load_cols(ref, shape):
    if cols_ok is None:
      return ref[...]
    return plgpu.load(ref, mask=jnp.broadcast_to(cols_ok, shape), other=0)

  def scale_row(j):  # [1, bn] float32; swapped: [bn, 1].
    s = load_cols(s_ref.at[pl.ds(j, 1), :], (1, bn))
    return s.T if cfg.swap else s

  def dot(x_MG, w_GN):
    if cfg.swap:  # [bn, group] x [group, 16]: the weight on the MMA's wide side.
      return jax.lax.dot_general(w_GN, x_MG, (((0,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    return jnp.dot(x_MG, w_GN, preferred_element_type=jnp.float32)

  def body(i, acc):
    j = j0 + i
    rows = pl.ds(pl.multiple_of(j * group, group), group)
    lo, hi = unpack_bf16(load_cols(p_ref.at[rows, :], (group, bn)), cfg.unpack)
    acc += dot(load_x(j), lo) * scale_row(j)
    return acc + dot(load_x(j + half_groups), hi) * scale_row(j + half_groups)

  shape = (bn, MAX_M) if cfg.swap else (MAX_M, bn)
  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(shape, jnp.float32))
  y = (acc.T if cfg.swap else acc).astype(o_ref.dtype)
  if rows_ok is None and cols_ok is None:
    o_ref[...] = y
  else:
    ok = jax.lax.broadcasted_iota(jnp.int32, (MAX_M, bn), 0) < m
    plgpu.store(o_ref, y, mask=ok if cols_ok is None else ok & cols_ok)


def check_config(cfg: GemvConfig):
  if cfg.bn < 16 or cfg.bn & (cfg.bn - 1):
    raise ValueError(f"GemvConfig.bn={cfg.bn}: a power of two >= 16 (Triton tiles)")
  if cfg.unpack not in UNPACKS:
    raise ValueError(f"GemvConfig.unpack={cfg.unpack!r}: one of {UNPACKS}")
  if cfg.split_k < 0 or cfg.per_sm < 1:
    raise ValueError(f"GemvConfig split_k={cfg.split_k} (>= 0, 0: by per_sm), "
                     f"per_sm={cfg.per_sm} (>= 1)")


def out_shape(m: int, n: int, k: int, group: int, cfg: GemvConfig = DEFAULT) -> tuple[int, ...]:
  """The kernel's output: [M, N], or [split, M, N] float32 partials."""
  sk = split_for(m, k, -(-n // cfg.bn), k // (2 * group), cfg.split_k, cfg.per_sm)
  return (m, n) if sk == 1 else (sk, m, n)


def int4_gemv(x, packed, scales, *, group: int = 128, out_dtype=jnp.bfloat16,
              config: GemvConfig | None = None, interpret: bool = False, out=None):
  """x [M <= 16, K] (cast to bf16) times the packed int4 weight, codes
  [K/2, N] or tiled [N/bn, K/2, bn] (``tile_codes``), with float32 scales
  [K/group, N]; ``out``: a poisoned buffer of ``out_shape`` aliased to the
  kernel's output (tests: every element written)."""
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  cfg = config or DEFAULT
  tiled = packed.ndim == 3
  if tiled:
    if config is not None and config.bn != packed.shape[2]:
      raise ValueError(f"GemvConfig.bn={config.bn} must be the tiled weight's tile width "
                       f"{packed.shape[2]} (tile_codes(codes, bn))")
    cfg = dataclasses.replace(cfg, bn=packed.shape[2])
  check_config(cfg)
  as_2d = (jax.ShapeDtypeStruct((packed.shape[1], packed.shape[0] * packed.shape[2]), packed.dtype)
           if tiled else packed)
  m, n, k = _check(x, as_2d, scales, group)
  if m > MAX_M:
    raise ValueError(f"int4_gemv takes M <= {MAX_M} rows (decode), got M={m}: "
                     "int4.int4_matmul tiles larger M")
  hg = k // (2 * group)
  n_tiles = -(-n // cfg.bn)
  sk = split_for(m, k, n_tiles, hg, cfg.split_k, cfg.per_sm)
  specs = [pl.BlockSpec((MAX_M, k), lambda j, s: (0, 0)),
           (pl.BlockSpec((None, k // 2, cfg.bn), lambda j, s: (j, 0, 0)) if tiled else
            pl.BlockSpec((k // 2, cfg.bn), lambda j, s: (0, j))),
           pl.BlockSpec((k // group, cfg.bn), lambda j, s: (0, j))]
  args, kw = [x.astype(jnp.bfloat16), packed, scales.astype(jnp.float32)], {}
  if sk == 1:
    out_spec = pl.BlockSpec((MAX_M, cfg.bn), lambda j, s: (0, j))
  else:
    out_spec = pl.BlockSpec((None, MAX_M, cfg.bn), lambda j, s: (s, 0, j))
  shape = out_shape(m, n, k, group, cfg)
  kernel = functools.partial(_kernel, m=m, n=n, group=group, half_groups=hg, steps=hg // sk,
                             cfg=cfg)
  if out is not None:
    if out.shape != shape:
      raise ValueError(f"out must be the kernel's output {shape}, got {out.shape}")
    kernel = with_poison(kernel, kw, specs, args, out, out_spec)
  y = pl.pallas_call(
      kernel, grid=(n_tiles, sk), in_specs=specs, out_specs=out_spec,
      out_shape=jax.ShapeDtypeStruct(shape, out_dtype if sk == 1 else jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret, name="int4_gemv", **kw)(*args)
  return y if sk == 1 else jnp.sum(y, axis=0).astype(out_dtype)

"""The KV cache of autoregressive decoding, storing quantized K/V when the
model's quant provider gives the attention a KV spec.

Each ``Attention`` built with ``decode=True`` keeps its keys and values in the
linen ``cache`` collection; ``nn.scan`` stacks them on a leading L axis like
the params (``decoder/layers/attn/k`` is [L, B, S, K, H]), unscanned layers
keep one set per ``decoder/layers_<i>/attn``. S is the buffer length, fixed
when the cache is made (``init_cache``). Variables, per attention module:

  no KV spec:  k, v                      [B, S, K, H] compute dtype
  KV spec:     k, v                      [B, S, K, H * c / 8] packed codes, uint8
               k_scale, v_scale          [B, S, K, H / g] float32
               k_zero_point, v_zero_point  like the scales, int8 (asymmetric only)

g is the number of elements sharing a scale: H for ``granularity="token"``
(one scale per token per head), ``group_size`` for ``"group"``. Codes of int
and ternary grids are packed along H into bytes of c-bit fields (``pack``):
c = 2 for 2-bit and ternary grids (four codes a byte), c = 4 for 3- and
4-bit grids (two a byte), c = 8 above; each field holds the code in c-bit
two's complement (asymmetric codes 0..2^b-1 are first recentred by -2^(b-1)
together with their zero point, which leaves (q - z) * s unchanged and fits
b = 8). A head width H not divisible by 8 / c keeps one code a byte. fp8
formats store float8 codes. Scales stay float32 so that a read, unpacked and
dequantized, equals the training forward's KV fake-quant exactly.

Memory per token per layer (keys and values together), K kv heads of width H:

  no spec:        2 * K * H * bytes(dtype)           (float32: 8KH, bfloat16: 4KH)
  spec, per token: 2 * K * (H * c / 8 + 4 + z)        z = 1 asymmetric, 0 symmetric
  spec, per group: 2 * K * (H * c / 8 + (H / g) * (4 + z))

e.g. K=2, H=48 (configs/default.py), asymmetric per token: int4 116 bytes,
int8 212, int2 68, against 768 in float32 (6.6x smaller at 4 bits).

Slot = position: the token at position p of row b is written to slot p and a
query at position p reads slots 0..p; the rest of the buffer is masked, so
stale slots never leak. Callers keep positions within [0, S): a write past
the end is clamped by ``dynamic_update_slice`` and would overwrite the tail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

if TYPE_CHECKING:
  from qtrain.quant.quantizer import QTensor
  from qtrain.quant.spec import QuantSpec

CACHE = "cache"


def _write(buf_BS, new_BT, start_B):
  """Copies new_BT[b] into buf_BS[b] from slot start_B[b] on."""
  put = lambda b, n, s: jax.lax.dynamic_update_slice_in_dim(b, n.astype(b.dtype), s, axis=0)
  return jax.vmap(put)(buf_BS, new_BT, start_B)


def _stored(module: nn.Module, name: str, new_BT, start_B):
  """Writes new_BT into cache variable ``name`` (made with new_BT's shape, i.e.
  S = T, when the cache is being created) and returns the whole buffer."""
  var = module.variable(CACHE, name, jnp.zeros, new_BT.shape, new_BT.dtype)
  var.value = _write(var.value, new_BT, start_B)
  return var.value


def _quantizer():
  """qtrain.quant.quantizer, imported on first use (as in Attention): importing
  qtrain.layers must not import qtrain.quant, whose config needs ml_collections."""
  from qtrain.quant import quantizer  # pylint: disable=g-import-not-at-top
  return quantizer


def code_bits(spec: QuantSpec, head_dim: int) -> int | None:
  """c, the bits of a code's field in the cache (None: float8 codes, unpacked)."""
  if spec.format in _quantizer().FP8_DTYPES:
    return None
  c = 2 if spec.format == "ternary" or spec.bits <= 2 else 4 if spec.bits <= 4 else 8
  return c if head_dim % (8 // c) == 0 else 8


def pack(q_BTKH, c: int):
  """int8 codes in [-2^(c-1), 2^(c-1)) -> uint8 [..., H * c / 8]; code j of a
  byte sits in bits [c*j, c*(j+1)) (the first code in the low bits)."""
  if c == 8:
    return jax.lax.bitcast_convert_type(q_BTKH.astype(jnp.int8), jnp.uint8)
  per = 8 // c
  u = (q_BTKH.astype(jnp.uint8) & (2 ** c - 1)).reshape(*q_BTKH.shape[:-1], -1, per)
  shifts = jnp.arange(per, dtype=jnp.uint8) * c
  return jnp.sum(u << shifts, axis=-1, dtype=jnp.uint8)  # Disjoint bits: sum == or.


def unpack(b_BTKP, c: int):
  """Inverse of ``pack``: uint8 [..., P] -> int8 codes [..., P * 8 / c]."""
  if c == 8:
    return jax.lax.bitcast_convert_type(b_BTKP, jnp.int8)
  per = 8 // c
  u = (b_BTKP[..., None] >> (jnp.arange(per, dtype=jnp.uint8) * c)) & (2 ** c - 1)
  q = u.astype(jnp.int8) - jnp.where(u >= 2 ** (c - 1), 2 ** c, 0).astype(jnp.int8)
  return q.reshape(*b_BTKP.shape[:-1], -1)


def quantize_kv(x_BTKH, spec: QuantSpec) -> QTensor:
  """x's codes as int8 (float8 for fp8), scales per token per head (or group)."""
  quantizer = _quantizer()
  qt = quantizer.quantize(x_BTKH, spec, contract_axis=-1)
  if spec.format in quantizer.FP8_DTYPES or qt.zero_point is None:
    return qt
  offset = 2 ** (spec.bits - 1)  # uint8 0..2^b-1 -> int8 -2^(b-1)..2^(b-1)-1.
  recentre = lambda a: (a.astype(jnp.int16) - offset).astype(jnp.int8)
  return quantizer.QTensor(recentre(qt.q), qt.scale, recentre(qt.zero_point))


def check_spec(spec: QuantSpec | None, where: str) -> None:
  if spec is None:
    return
  if spec.granularity not in ("token", "group"):
    raise ValueError(f"{where}: kv granularity={spec.granularity!r} shares a scale across "
                     "tokens, which a cache filled token by token cannot reproduce; use "
                     "granularity='token' or 'group'")
  if spec.stochastic_rounding:
    raise ValueError(f"{where}: the KV cache rounds to nearest; set stochastic_rounding=False")


def update(module: nn.Module, name: str, x_BTKH, positions_BT, spec: QuantSpec | None):
  """Stores x_BTKH (keys or values) at slots positions_BT[:, 0] + t and returns
  the whole buffer [B, S, K, H] in x's dtype, dequantized when ``spec``."""
  start_B = positions_BT[:, 0]
  if spec is None:
    return _stored(module, name, x_BTKH, start_B)
  check_spec(spec, "/".join(module.scope.path))
  qt = quantize_kv(x_BTKH, spec)
  c = code_bits(spec, x_BTKH.shape[-1])
  q = _stored(module, name, qt.q if c is None else pack(qt.q, c), start_B)
  q = q if c is None else unpack(q, c)
  scale = _stored(module, f"{name}_scale", qt.scale, start_B)
  zero = None if qt.zero_point is None else _stored(module, f"{name}_zero_point",
                                                      qt.zero_point, start_B)
  quantizer = _quantizer()
  return quantizer.dequantize(quantizer.QTensor(q, scale, zero), x_BTKH.dtype)


def visible(positions_BT, length: int):
  """mask_BTS: the query at position p sees slots 0..p of the buffer."""
  return jnp.arange(length)[None, None, :] <= positions_BT[:, :, None]


def init_cache(model: nn.Module, batch: int, max_len: int):
  """Zeros for every cache variable of ``model.apply(..., decode=True)``,
  with S = max_len slots per row. Traces the model once; computes nothing."""
  tokens_BS = jnp.zeros((batch, max_len), jnp.int32)
  shapes = jax.eval_shape(lambda rng: model.init(rng, tokens_BS, decode=True)[CACHE],
                          jax.random.key(0))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def cache_bytes_per_token(cache, batch: int, max_len: int) -> float:
  """Bytes one token occupies in ``cache``, all layers, K and V together."""
  total = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
  return total / (batch * max_len)

"""Which quantizer serves which matmul: ordered regex rules over module paths.

A rule's ``pattern`` is matched with ``re.fullmatch`` against the canonical
path of the module that owns the matmul (``decoder/layers/attn/q_proj``,
``lm_head``, a low-rank factor ``decoder/layers/mlp/up_proj/a``) or, for
``kv``, of the attention module (``decoder/layers/attn``). Paths carry no
layer index, scanned or not; ``layers`` restricts a rule to block indices
(``(0,)``, ``"0-3,22"``; None: every block and the matmuls outside the stack).
The first rule that matches wins (big_vision / qwix style); a matching rule
with neither ``weight`` nor ``act`` keeps that matmul in high precision, which
is how a later, broader rule is overridden ("layer 0 at 8 bits" is a rule with
``layers=(0,)`` before the 4-bit one). Matmuls that no rule matches stay in
high precision by design and are listed by ``QuantProvider.report()``.
"""

from __future__ import annotations

import dataclasses
import re

from qtrain.quant.spec import QuantSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule:
  # Regex, fully matched against the canonical module path.
  pattern: str
  # Quantizer of the matmul's weight operand (rhs); None: not quantized.
  weight: QuantSpec | None = None
  # Quantizer of the matmul's activation operand (lhs); None: not quantized.
  act: QuantSpec | None = None
  # Quantizer of the attention's keys and values, for attention module paths.
  kv: QuantSpec | None = None
  # Block indices the rule applies to; None: all, and non-block matmuls too.
  layers: frozenset[int] | None = None

  def matches(self, path: str, layer: int | None = None) -> bool:
    if re.fullmatch(self.pattern, path) is None:
      return False
    return self.layers is None or (layer is not None and layer in self.layers)


def first_match(rules, path: str, layer: int | None = None) -> int | None:
  """Index of the first rule matching ``path`` (at block ``layer``), else None."""
  for i, rule in enumerate(rules):
    if rule.matches(path, layer):
      return i
  return None


def parse_layers(value, where: str) -> frozenset[int] | None:
  """None, an int, a sequence of ints, or a string like "0-3,7"."""
  if value is None:
    return None
  if isinstance(value, int) and not isinstance(value, bool):
    value = (value,)
  if isinstance(value, str):
    out = []
    for part in filter(None, (p.strip() for p in value.split(","))):
      lo, _, hi = part.partition("-")
      if not (lo.isdigit() and (not hi or hi.isdigit())):
        raise ValueError(f"{where}={value!r}: use indices and ranges like '0-3,7'")
      out.extend(range(int(lo), int(hi or lo) + 1))
    value = out
  if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
    raise ValueError(f"{where}={value!r}: block indices are ints >= 0")
  return frozenset(value)

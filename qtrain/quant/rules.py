"""Which quantizer serves which matmul: ordered regex rules over module paths.

A rule's ``pattern`` is matched with ``re.fullmatch`` against the path of the
module that owns the matmul (``decoder/layers/attn/q_proj``, ``lm_head``) or,
for ``kv``, of the attention module (``decoder/layers/attn``). The first rule
that matches wins (big_vision / qwix style); a matching rule with neither
``weight`` nor ``act`` keeps that matmul in high precision, which is how a
later, broader rule is overridden. Paths that no rule matches stay in high
precision by design and are listed by ``QuantProvider.report()``.
"""

from __future__ import annotations

import dataclasses
import re

from qtrain.quant.spec import QuantSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule:
  # Regex, fully matched against the module path.
  pattern: str
  # Quantizer of the matmul's weight operand (rhs); None: not quantized.
  weight: QuantSpec | None = None
  # Quantizer of the matmul's activation operand (lhs); None: not quantized.
  act: QuantSpec | None = None
  # Quantizer of the attention's keys and values, for attention module paths.
  kv: QuantSpec | None = None

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.pattern, path) is not None


def first_match(rules, path: str) -> int | None:
  """Index of the first rule whose pattern matches ``path``, else None."""
  for i, rule in enumerate(rules):
    if rule.matches(path):
      return i
  return None

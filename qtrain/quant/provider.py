"""The quantization provider: rules -> the quantizer of each matmul and KV site.

``QuantProvider`` plugs into the model's hooks (``qtrain.layers.hooks``): at
every matmul site it wraps the dot below it with ``quant_dot`` for the first
matching rule, and at the ``key`` / ``value`` sites it applies the rule's KV
quantizer (fake-quant with its STE in training; ``kv_spec`` gives the decode
cache the same format).

Per-layer rules under ``nn.scan``: the block is traced once with its index as
a traced scalar. When the rules choose differently per block, the site runs
``lax.switch`` over the distinct choices, indexed by a static table
[rule of block 0, ..., rule of block L-1]: per-layer data stacked on the layer
axis, compiled once. Learned steps (LSQ) create params, which a switch branch
cannot: their rules must agree across the blocks of a scanned stack (config
validation says so and how to fix it).

``rotation`` (a ``qtrain.quant.rotated.RotationProvider``) composes outside
the quantizer: it rotates both operands, (X R)(R^T W), and the quantizer then
sees the rotated ones (RoSTE).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from qtrain.layers.hooks import Provider
from qtrain.quant import estimators
from qtrain.quant.dot_general import DotSpec, needs_rng, quant_dot, quant_rng
from qtrain.quant.rules import QuantRule, first_match

KV_SITES = ("key", "value")


class MatchLog:
  """Trace-time record of which path took which rule (mutable, not hashed)."""

  def __init__(self):
    self.paths: dict[str, int | None | tuple] = {}
    self.kv_paths: dict[str, int | None | tuple] = {}


def choice_per_layer(rules, path: str, layered: bool, layer, n_layers: int):
  """The rule index for ``path``: an int/None, or a tuple of one per block
  when the block index is traced and the rules differ between blocks."""
  if not layered:
    return first_match(rules, path, None)
  if isinstance(layer, int):
    return first_match(rules, path, layer)
  per = tuple(first_match(rules, path, i) for i in range(n_layers))
  return per[0] if len(set(per)) == 1 else per


def _switch(choice: tuple, layer, branches: dict, *operands):
  """lax.switch over the distinct rules of ``choice`` by the block index."""
  keys = list(branches)
  table = jnp.asarray([keys.index(c) for c in choice], jnp.int32)
  return jax.lax.switch(table[layer], [branches[k] for k in keys], *operands)


@dataclasses.dataclass(frozen=True)
class QuantProvider(Provider):
  """Ordered rules -> the quantizer of each matmul path (first match wins)."""
  rules: tuple[QuantRule, ...] = ()
  mode: str = "fake"
  int8_backward: bool = True
  grad_stochastic_rounding: bool = False
  rotation: Provider | None = None  # Applied to the operands before they are quantized.
  kernels: str = "xla"  # int8 dots: qtrain.kernels.dispatch's switch (config.quant.kernels).
  amax_history: int = 0  # Per-tensor fp8: delayed scaling (config.quant.amax_history).
  amax_seed: bool = False  # The seeding pass of delayed scaling (qtrain.quant.delayed).
  log: MatchLog = dataclasses.field(default_factory=MatchLog, compare=False, repr=False)

  def dot_spec(self, i: int | None) -> DotSpec:
    rule = None if i is None else self.rules[i]
    if rule is None:
      return DotSpec(mode="none")
    return DotSpec(rule.weight, rule.act, self.mode, self.int8_backward,
                   self.grad_stochastic_rounding, kernels=self.kernels,
                   amax_history=self.amax_history, amax_seed=self.amax_seed)

  def lhs_grad_passes(self, site, hooks) -> bool:
    """Fake quantization with a plain STE on the activations (or none) hands
    the dot's lhs cotangent back unchanged; clipped STE masks it, learned
    steps take their gradient from it, the int8/fp8 custom VJPs and a
    RotationProvider run their own backward dots."""
    if self.rotation is not None and not self.rotation.lhs_grad_passes(site, hooks):
      return False
    choice = self._choice(site, hooks)
    for i in dict.fromkeys(choice if isinstance(choice, tuple) else (choice,)):
      spec = self.dot_spec(i)
      if not spec.quantizes:
        continue
      act = spec.act
      if spec.mode != "fake" or (act is not None and (act.learned or act.estimator != "ste")):
        return False
    return True

  def dot(self, site, hooks, inner):
    quantized = self._quant_dot(site, hooks, inner)
    return quantized if self.rotation is None else self.rotation.dot(site, hooks, quantized)

  def joined_dot(self, sites, hooks, inner):
    """Joined weights take one quantizer only where each part's would be the
    same per-tensor fp8 one (or none): one scale then serves the joined
    weight, its input and its output gradient, as TransformerEngine's fused
    QKV GEMM does. Those scales are the parts' largest (powers of two, so a
    part's codes move only where they would fall below float8's smallest
    subnormal). Other quantizers (per channel / token / group, learned
    steps, per-block rules) see each weight on its own."""
    if self.rotation is not None:
      return None
    choices = [self._choice(site, hooks) for site in sites]
    if isinstance(choices[0], tuple) or len(set(choices)) != 1:
      return None
    spec = self.dot_spec(choices[0])
    if spec.quantizes and not spec.fp8_per_tensor:
      return None
    for site in sites:
      self.log.paths[site.path] = choices[0]
    if not spec.quantizes:
      return inner
    # The joined dot runs in the parts' parent module: its amax history is
    # named after them ("q_proj+k_proj+v_proj").
    name = "+".join(site.path.rsplit("/", 1)[-1] for site in sites)
    return functools.partial(quant_dot, spec, inner, amax_name=name)

  def _choice(self, site, hooks):
    """The rule index at ``site`` (a tuple per block where the blocks differ)."""
    return choice_per_layer(self.rules, site.path, site.layered,
                            site.layer if site.layer is not None else hooks.layer,
                            hooks.n_layers)

  def _quant_dot(self, site, hooks, inner):
    choice = self._choice(site, hooks)
    self.log.paths[site.path] = choice
    if not isinstance(choice, tuple):
      spec = self.dot_spec(choice)
      return functools.partial(quant_dot, spec, inner) if spec.quantizes else inner
    specs = {i: self.dot_spec(i) for i in dict.fromkeys(choice)}
    if any(s.quantizes and ((s.weight and s.weight.learned) or (s.act and s.act.learned))
           for s in specs.values()):
      raise ValueError(f"{site.path}: rules with learned steps differ between the blocks of a "
                       "scanned stack; give every block the same learned rule or set "
                       "config.model.scan_layers=False")

    def per_layer(module, lhs, rhs, dims, precision=None, preferred_element_type=None):
      rng = quant_rng(module) if any(needs_rng(s) for s in specs.values()) else None
      branches = {i: functools.partial(
          lambda s, l, r: quant_dot(s, inner, module, l, r, dims, precision,
                                    preferred_element_type, rng=rng), s)
                  for i, s in specs.items()}
      return _switch(choice, hooks.layer, branches, lhs, rhs)
    return per_layer

  def _kv_choice(self, path, hooks):
    return choice_per_layer(self.rules, path, path.startswith("decoder/layers"), hooks.layer,
                            hooks.n_layers)

  def activation(self, path, name, hooks, module, x):
    if name not in KV_SITES or self.mode == "none":
      return x
    choice = self._kv_choice(path, hooks)
    self.log.kv_paths[path] = choice
    kv = lambda i: None if i is None else self.rules[i].kv
    quant = lambda spec, x: x if spec is None else estimators.fake_quant_ste(
        x, spec, contract_axis=-1)
    if not isinstance(choice, tuple):
      return quant(kv(choice), x)
    branches = {i: functools.partial(quant, kv(i)) for i in dict.fromkeys(choice)}
    return _switch(choice, hooks.layer, branches, x)

  def kv_spec(self, path, hooks):
    if self.mode == "none":
      return None
    choice = self._kv_choice(path, hooks)
    specs = {None if i is None else self.rules[i].kv
             for i in (choice if isinstance(choice, tuple) else (choice,))}
    if len(specs) > 1:
      raise ValueError(f"{path}: KV quantizers differ between the blocks of a scanned stack, "
                       "which one cache layout cannot hold; set config.model.scan_layers=False")
    return specs.pop()

  def unmatched_paths(self) -> list[str]:
    return sorted(p for p, i in self.log.paths.items() if i is None)

  def unused_rules(self) -> list[int]:
    used = set()
    for choice in (*self.log.paths.values(), *self.log.kv_paths.values()):
      used.update(choice if isinstance(choice, tuple) else (choice,))
    return [i for i in range(len(self.rules)) if i not in used]

  def report(self) -> str:
    """Every matmul seen with its rule (per block where they differ), and
    rules that matched nothing."""
    lines = [f"quant mode={self.mode}: {len(self.log.paths)} matmul paths seen"]
    for p, i in sorted(self.log.paths.items()):
      if isinstance(i, tuple):
        lines.append(f"  {p}: per block " + ", ".join(
            f"{b}:{'-' if r is None else r}" for b, r in enumerate(i)))
      else:
        lines.append(f"  {p}: " + ("high precision (no rule)" if i is None else f"rule {i}"))
    for i in self.unused_rules():
      lines.append(f"  rule {i} ({self.rules[i].pattern!r}) matched nothing")
    if self.rotation is not None:
      table = getattr(self.rotation, "table", None)
      lines.append(f"  rotated first: {getattr(self.rotation, 'pattern', self.rotation)!r}, "
                   + ("every block" if table is None else "per block " + ", ".join(
                       f"{p}:{''.join('1' if b else '0' for b in on)}" for p, on in table)))
    return "\n".join(lines)

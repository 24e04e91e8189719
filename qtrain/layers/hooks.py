"""The model's seams: what every layer asks about its own path.

Layers never branch on quantization, rotation, calibration or telemetry. Each
module holds one ``Hooks`` value and asks it three things:

* ``dot_fn(site, inner)``: the function that performs a weight matmul. Every
  provider may wrap the one below it (quantize its operands, rotate them, sow
  statistics of the input, or replace the dot with an int8 kernel).
* ``activation(module, name, x)``: a *named site* in the block, e.g. ``key``
  and ``value`` (K after RoPE and the online R3 rotation when on, V: the KV
  quantizer), ``query`` (Q after RoPE and R3), ``mlp_hidden`` (the SwiGLU
  hidden: down_proj's input, before the optional FFN Hadamard / R4), ``block_out`` (the residual stream
  after each block). Online rotations and telemetry attach here.
* ``kv_spec(module)``: how the decode-time KV cache stores keys and values.

A ``Provider`` implements any of these (the base class passes everything
through); ``Hooks.providers`` composes them, outermost first: with
``(telemetry, rotation, quant)`` telemetry sees the raw input, the rotation
rotates it and the quantizer quantizes the rotated operands.

Context that providers may read: ``layer`` (the block index: a Python int for
unscanned layers, a traced int32 scalar under ``nn.scan``, None outside the
stack; per-layer choices are tables indexed by it, never unscanning) and
``token_mask`` (True for real tokens, [B, T]; observers skip padding).

Paths are canonical: module path without the layer index,
``decoder/layers/attn/q_proj`` for scanned and unscanned stacks alike, so one
rule serves both; the index is ``layer``.

``scoped_providers(*providers)`` adds providers for the matmuls traced inside
a ``with`` block only, outside the model's own: a step uses it to change one
trace of the loss without rebuilding the model (the zeroth-order step adds
its perturbation to each weight right before its dot, layer by layer inside
the scan). It acts at trace time: what a traced value may depend on comes in
through the provider's fields (a key, a scale), never from outside the trace.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from typing import Any, Callable

import flax.linen as nn
import jax

# f(module, lhs, rhs, dimension_numbers, precision, preferred_element_type) -> out;
# ``module`` is the matmul's own scope (params, sows, rngs of a provider live there).
DotFn = Callable[..., jax.Array]

# Providers of ``scoped_providers`` blocks being traced, outermost first.
_SCOPED: contextvars.ContextVar[tuple] = contextvars.ContextVar("qtrain_scoped_providers",
                                                                 default=())

_LAYER = re.compile(r"^(decoder/layers)_(\d+)(/|$)")


def canonical_path(module: nn.Module) -> tuple[str, int | None]:
  """(path without the layer index, the index if the module sits in an
  unscanned stack) of ``module``; scan/remat wrappers add no names."""
  path = "/".join(module.scope.path)
  m = _LAYER.match(path)
  if m is None:
    return path, None
  return _LAYER.sub(r"\1\3", path, count=1), int(m.group(2))


@dataclasses.dataclass(frozen=True)
class MatmulSite:
  """One weight matmul, as providers, the registry and PTQ see it."""
  path: str  # Canonical path of the matmul ("decoder/layers/attn/q_proj", ".../q_proj/b").
  param: tuple[str, ...]  # Key path of the weight operand in the params tree (scanned layout).
  in_features: int  # The contraction dim.
  out_features: int
  stacked: bool = False  # Scanned stack: the weight param is [L, in, out].
  layer: int | None = None  # Block index of an unscanned stack's matmul.
  weight_axis: int = 0  # The weight's contraction axis (1 for the tied LM head's [V, D]).

  @classmethod
  def at(cls, path: str, layer: int | None, param: tuple[str, ...], in_features: int,
         out_features: int) -> "MatmulSite":
    """The site at canonical ``path`` (``layer``: the block of an unscanned
    stack, from ``canonical_path``), stacked where it sits in a scanned one."""
    return cls(path=path, param=param, in_features=in_features, out_features=out_features,
               stacked=layer is None and path.startswith("decoder/layers/"), layer=layer)

  @property
  def module_path(self) -> str:
    """The path with the block index of an unscanned stack put back
    (``decoder/layers_3/attn/q_proj``): one name per weight, as PTQ keys them."""
    if self.layer is None:
      return self.path
    return self.path.replace("decoder/layers/", f"decoder/layers_{self.layer}/", 1)

  @property
  def layered(self) -> bool:
    """Inside the decoder stack (per-layer rules apply)."""
    return self.stacked or self.layer is not None


class Provider:
  """Pass-through base: override the hooks a method needs."""

  def dot(self, site: MatmulSite, hooks: "Hooks", inner: DotFn) -> DotFn:
    del site, hooks
    return inner

  def activation(self, path: str, name: str, hooks: "Hooks", module: nn.Module, x):
    del path, name, hooks, module
    return x

  def wraps_dots(self) -> bool:
    """Whether ``dot`` is overridden (else every matmul passes through as is)."""
    return type(self).dot is not Provider.dot

  def lhs_grad_passes(self, site: MatmulSite, hooks: "Hooks") -> bool:
    """Whether this provider's ``dot`` at ``site`` hands the inner dot's lhs
    cotangent back unchanged as its own (it may transform the weight, observe
    the activations, or quantize them with a plain STE). A rotation of the
    activations before it may then apply R^T through the weight
    (``Hooks.lhs_rotation``). The base: True unless ``dot`` is overridden."""
    del site, hooks
    return not self.wraps_dots()

  def kv_spec(self, path: str, hooks: "Hooks") -> Any:
    del path, hooks
    return None

  def joined_dot(self, sites: tuple[MatmulSite, ...], hooks: "Hooks",
                 inner: DotFn) -> DotFn | None:
    """One dot for the weights of ``sites`` joined along their outputs (one
    input x, ``qtrain.layers.linear.fused_dense``), or None where this
    provider must see each matmul on its own. The base: ``inner`` where
    ``dot`` is the pass-through, else None."""
    del sites, hooks
    return None if self.wraps_dots() else inner


def xla_dot(module, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """The innermost dot: ``jax.lax.dot_general`` as asked (the input dtype out
  unless ``preferred_element_type``; XLA accumulates bf16 dots in float32 on GPU/TPU)."""
  del module
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


@dataclasses.dataclass(frozen=True, eq=False)
class Hooks:
  """The providers of a model, the weight-form rules, and per-call context."""
  providers: tuple[Provider, ...] = ()
  forms: tuple = ()  # qtrain.layers.weights.FormRule, first match wins; none: dense.
  layer: Any = None  # Block index (int, traced int32 under scan, None outside the stack).
  n_layers: int = 0
  token_mask: Any = None  # [B, T] bool, True on real tokens; None when unknown.
  # An online rotation of the activation operand (qtrain.layers.rotation.Online:
  # R4 on down_proj), applied before every provider (they see x R).
  lhs_rotation: Any = None

  def with_context(self, **kw) -> "Hooks":
    return dataclasses.replace(self, **kw)

  def active_providers(self) -> tuple[Provider, ...]:
    """The providers wrapping a matmul traced now, outermost first: those of
    enclosing ``scoped_providers`` blocks, then the model's."""
    return _SCOPED.get() + self.providers

  def joined_dot_fn(self, sites: tuple[MatmulSite, ...]) -> DotFn | None:
    """The dot of the joined weights of ``sites`` (see ``Provider.joined_dot``)
    through every provider, or None where one must see them apart or an
    activation rotation is set."""
    if self.lhs_rotation is not None:
      return None
    fn = xla_dot
    for p in reversed(self.active_providers()):
      fn = p.joined_dot(sites, self, fn)
      if fn is None:
        return None
    return fn

  def dot_fn(self, site: MatmulSite) -> DotFn:
    providers = self.active_providers()
    rot = self.lhs_rotation
    # R^T through the weight where every provider passes the cotangent on.
    fold = rot is not None and rot.fold and all(p.lhs_grad_passes(site, self) for p in providers)
    fn = rot.grad_through_weight(xla_dot) if fold else xla_dot
    for p in reversed(providers):
      fn = p.dot(site, self, fn)
    if rot is None:
      return fn
    if site.in_features != rot.n:
      raise ValueError(f"{site.path}: the online rotation {rot.which} is over {rot.n} "
                       f"features, the matmul contracts {site.in_features}")

    def rotated(module, lhs, rhs, *args):
      return fn(module, rot.apply(lhs, grad=not fold), rhs, *args)
    return rotated

  def activation(self, module: nn.Module, name: str, x):
    path, _ = canonical_path(module)
    for p in self.providers:
      x = p.activation(path, name, self, module, x)
    return x

  def kv_spec(self, module: nn.Module):
    path, _ = canonical_path(module)
    specs = [s for s in (p.kv_spec(path, self) for p in self.providers) if s is not None]
    if len(specs) > 1:
      raise ValueError(f"{path}: {len(specs)} providers define the KV cache format; keep one")
    return specs[0] if specs else None


@contextlib.contextmanager
def scoped_providers(*providers: Provider):
  """Within the block, ``providers`` wrap every matmul traced (outermost, an
  enclosing block's outside these), as if the model held them first in its
  ``Hooks.providers``. Their ``dot`` hooks only; the model is not rebuilt."""
  token = _SCOPED.set(_SCOPED.get() + tuple(providers))
  try:
    yield
  finally:
    _SCOPED.reset(token)


def as_hooks(provider=None) -> Hooks:
  """Hooks from None, one provider, a tuple of them (outermost first), or Hooks."""
  if isinstance(provider, Hooks):
    return provider
  if provider is None:
    return Hooks()
  if isinstance(provider, (tuple, list)):
    return Hooks(providers=tuple(provider))
  return Hooks(providers=(provider,))

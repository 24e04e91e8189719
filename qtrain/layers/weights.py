"""Weight forms: how a ``Linear`` holds its weight, chosen by path rules.

A form creates the layer's params and issues its product(s) through the one
matmul hook (``Matmul``), one ``MatmulSite`` per product, so quantization,
rotation, calibration, PTQ and export see every form alike.

* ``dense`` (default): ``kernel`` [in, out]; y = x @ W.
* ``low_rank``: ``a`` [in, r] and ``b`` [r, out]; y = (x @ A) @ B, two matmuls
  at ``<path>/a`` and ``<path>/b`` (a quant rule for ``.*_proj`` leaves them
  in high precision and the start-up report lists them; match them with
  ``.*_proj(/a|/b)?``). Init: entries of both factors ~ N(0, sigma / sqrt(r))
  in variance (std sqrt(sigma) / r^(1/4)), so each entry of A B has variance
  r * (sigma / sqrt(r))^2 = sigma^2: the dense layer's at init std sigma.

* ``sparse_low_rank`` (SLTrain, Han et al. 2024, arXiv 2406.02214): W = A B + S,
  the low-rank pair as above plus ``s`` [nnz], the values of a sparse S on a
  fixed random support of ``density`` * in * out entries. Two ways to issue
  the product, the same function y = x A B + x S:

  - ``merged=True``: one product y = x @ W at ``<path>`` (the dense form's
    site and module name), W = A B + S built per layer from the params inside
    the (scanned, rematerialised) block: SLTrain's own implementation, whose
    saving is in params and optimizer state, not activations. Quantizers see
    W, the weight the layer applies (as L4Q quantizes the merged W + B A), and
    a rule for ``.*_proj`` matches it as it matches a dense layer.
  - ``merged=False`` (default, so sites and quantizers stay as they were):
    three products, each a ``MatmulSite``: ``<path>/a``, ``<path>/b`` and
    ``<path>/s`` = x @ S with S scattered into a dense [in, out]; quantizers
    see A, B and S apart (factor-wise QAT).

  Why merged for training: under the model's remat policies a saved
  activation is a matmul output, so the three products keep x A [T, r],
  x A B and x S [T, out] per layer (2.25x the dense layer's one [T, out] for
  a square layer at r = d / 4; a nested remat cannot drop them, the outer
  policy decides inside it) and cost the dense layer's FLOPs plus the pair's,
  while x @ W keeps one [T, out] (plus A B, weight-sized, per layer) at the
  dense layer's FLOPs. Compiled train step of llama_125m, 64 x 1024 tokens,
  ``dots_no_batch``, XLA's temp bytes on CPU (compile only): dense AdamW
  44.24 GiB, three products 69.28 GiB, merged 44.37 GiB; a gather-based
  x[..., rows] * s summed into columns (no dense S, no hook) 120.07 GiB: its
  [T, nnz] products outweigh any dense S.

  Only the values are stored: the train state holds trainable params only
  (an int index array cannot be a param: it has no gradient, and a dense mask
  would cost the dense layer's memory, the thing SLTrain saves). The support
  is redrawn identically at every call from a key fixed by the rule's
  ``seed``, the layer's canonical path and its block index (so every layer of
  a scanned stack has its own); indices are drawn with replacement (cheap: no
  permutation of in * out), a duplicate adding two values at one entry, so the
  distinct support is density * (1 - density / 2) on average. Values init
  N(0, init_std) (SLTrain's sparse part starts at the dense init's scale).
  The merged site's ``param`` names ``s``: W is no param, so PTQ refuses the
  site by shape (as it refuses the three-product ``s``) and zeroth-order
  perturbation moves a, b and s as plain leaves.

* ``int4_packed`` (inference: PTQ exports, generation): ``codes`` int8
  [in/2, out], two symmetric 4-bit codes a byte in the W4A16 kernel's
  "halves" layout, and ``scales`` float32 [1, out] (``group_size=0``: per
  output channel) or [in / group_size, out]. The product goes through the
  matmul hook with the weight operand a ``qtrain.kernels.packed.PackedInt4``;
  an innermost provider the form adds runs it: the W4A16 kernel for bf16
  activations on GPU/TPU under ``kernels="auto"``, else unpack + dequantize
  + the same dot as ``dense`` (bit-identical to the dense layer holding the
  dequantized weight). Outer providers see the activations as usual (the
  activation / KV quantizers, AWQ input scales, telemetry); one that
  transforms the weight operand (a weight quantizer, a rotation) cannot run
  on codes. Integer params have no gradient: not a training form.
  ``qtrain.quantize.export.load_packed`` builds these params from a PTQ export.

New forms (rotated, ...) subclass ``WeightForm``, register in ``FORMS`` and
take their options from the rule.

  config.model.weight_forms = (
      dict(pattern=r"decoder/layers/(attn|mlp)/.*", form="low_rank", rank=64),)
"""

from __future__ import annotations

import abc
import dataclasses
import re
from typing import Any, ClassVar

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtrain.kernels import dispatch, packed
from qtrain.layers.dot_general import Matmul
from qtrain.layers.hooks import MatmulSite, Provider, canonical_path


def _contract_last(x, w):
  return (((x.ndim - 1,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class WeightForm(abc.ABC):
  """Creates the params of ``linear`` and returns y for input x."""
  # x enters exactly one matmul hook, so an online rotation of x
  # (``Hooks.lhs_rotation``) can run in it; other forms get x rotated by
  # ``Linear`` first.
  one_product: ClassVar[bool] = False

  @abc.abstractmethod
  def __call__(self, linear: nn.Module, hooks, x) -> Any:
    """Creates the form's params on ``linear`` and multiplies x through ``hooks``."""

  @staticmethod
  def site(linear, name: str | None, weight: str, fan_in: int, fan_out: int) -> MatmulSite:
    path, layer = canonical_path(linear)
    return MatmulSite.at(path if name is None else f"{path}/{name}", layer,
                         (*linear.scope.path, weight), fan_in, fan_out)

  @staticmethod
  def matmul(linear, hooks, site: MatmulSite, name: str, x, w):
    x = x.astype(linear.dtype)
    w = jnp.asarray(w, linear.dtype)
    return Matmul(site, hooks, parent=linear, name=name)(x, w, _contract_last(x, w))


@dataclasses.dataclass(frozen=True)
class Dense(WeightForm):
  """y = x @ W, W = ``kernel`` [in, out]."""
  one_product: ClassVar[bool] = True

  @staticmethod
  def kernel(linear, fan_in: int):
    """The ``kernel`` [in, out] param of ``linear`` (a module with ``features``,
    ``kernel_axes``, ``kernel_init`` and ``param_dtype``)."""
    return linear.param("kernel", nn.with_logical_partitioning(linear.kernel_init,
                                                               linear.kernel_axes),
                        (fan_in, linear.features), linear.param_dtype)

  def __call__(self, linear, hooks, x):
    fan_in, fan_out = x.shape[-1], linear.features
    kernel = self.kernel(linear, fan_in)
    site = self.site(linear, None, "kernel", fan_in, fan_out)
    return self.matmul(linear, hooks, site, "dot_general", x, kernel)


@dataclasses.dataclass(frozen=True)
class LowRank(WeightForm):
  """y = (x @ A) @ B with A = ``a`` [in, r], B = ``b`` [r, out]."""
  rank: int = 0
  init_std: float = 0.02

  def factors(self, linear, fan_in: int, fan_out: int):
    """The params (A [in, r], B [r, out]) of ``linear``."""
    r = self.rank
    in_axis, out_axis = linear.kernel_axes
    init = nn.initializers.normal(self.init_std ** 0.5 / r ** 0.25)  # Var(AB) = sigma^2.
    a = linear.param("a", nn.with_logical_partitioning(init, (in_axis, "rank")),
                     (fan_in, r), linear.param_dtype)
    b = linear.param("b", nn.with_logical_partitioning(init, ("rank", out_axis)),
                     (r, fan_out), linear.param_dtype)
    return a, b

  def __call__(self, linear, hooks, x):
    fan_in, fan_out, r = x.shape[-1], linear.features, self.rank
    a, b = self.factors(linear, fan_in, fan_out)
    h = self.matmul(linear, hooks, self.site(linear, "a", "a", fan_in, r), "dot_a", x, a)
    return self.matmul(linear, hooks, self.site(linear, "b", "b", r, fan_out), "dot_b", h, b)


def sparse_support(seed: int, path: str, layer, fan_in: int, fan_out: int, nnz: int):
  """(rows, cols) [nnz] of the fixed support of the layer at ``path`` (block
  ``layer``: a Python int, a traced int under ``nn.scan``, or None)."""
  key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()))
  key = jax.random.fold_in(key, 0 if layer is None else layer)
  flat = jax.random.randint(key, (nnz,), 0, fan_in * fan_out)
  return flat // fan_out, flat % fan_out


@dataclasses.dataclass(frozen=True)
class SparseLowRank(LowRank):
  """y = x @ (A B + S), S sparse on a fixed support: one product (``merged``)
  or three (see the module)."""
  density: float = 0.03  # SLTrain's delta: stored values / (in * out).
  seed: int = 0  # Picks the supports (with each layer's path and index).
  merged: bool = False  # One product x @ (A B + S) at <path>; else /a, /b, /s.

  def sparse(self, linear, hooks, fan_in: int, fan_out: int, onto):
    """``onto`` [in, out] plus S: the param ``s`` added at the layer's support."""
    nnz = max(1, round(self.density * fan_in * fan_out))
    values = linear.param("s", nn.with_logical_partitioning(
        nn.initializers.normal(self.init_std), ("sparse",)), (nnz,), linear.param_dtype)
    rows, cols = sparse_support(self.seed, canonical_path(linear)[0], hooks.layer,
                                fan_in, fan_out, nnz)
    return onto.at[rows, cols].add(values.astype(onto.dtype))

  def __call__(self, linear, hooks, x):
    fan_in, fan_out = x.shape[-1], linear.features
    if self.merged:
      a, b = self.factors(linear, fan_in, fan_out)
      # In the params' dtype: W is rounded once, to the compute dtype, by matmul().
      w = self.sparse(linear, hooks, fan_in, fan_out, a @ b)
      site = self.site(linear, None, "s", fan_in, fan_out)
      return self.matmul(linear, hooks, site, "dot_general", x, w)
    y = super().__call__(linear, hooks, x)
    s = self.sparse(linear, hooks, fan_in, fan_out,
                    jnp.zeros((fan_in, fan_out), linear.param_dtype))
    site = self.site(linear, "s", "s", fan_in, fan_out)
    return y + self.matmul(linear, hooks, site, "dot_s", x, s)


@dataclasses.dataclass(frozen=True)
class _PackedDot(Provider):
  """Innermost provider of a packed layer: a ``PackedInt4`` weight operand is
  multiplied by ``qtrain.kernels.packed.dot``, anything else by the dot below."""
  kernels: str = "auto"

  def dot(self, site, hooks, inner):
    def fn(module, lhs, rhs, dims, precision=None, preferred_element_type=None):
      if isinstance(rhs, packed.PackedInt4):
        return packed.dot(lhs, rhs, dims, precision, preferred_element_type,
                          kernels=self.kernels)
      return inner(module, lhs, rhs, dims, precision, preferred_element_type)
    return fn


@dataclasses.dataclass(frozen=True)
class Int4Packed(WeightForm):
  """y = x @ W^, W^ = unpack(``codes``) * ``scales`` (see the module doc)."""
  one_product: ClassVar[bool] = True
  group_size: int = 0  # 0: one scale per output channel; else rows of `in` per scale.
  kernels: str = "auto"  # qtrain.kernels.dispatch: "auto" | "xla" | "interpret".

  def __call__(self, linear, hooks, x):
    fan_in, fan_out = x.shape[-1], linear.features
    in_axis, out_axis = linear.kernel_axes
    n_scales = fan_in // self.group_size if self.group_size else 1
    if fan_in % 2 or (self.group_size and fan_in % self.group_size):
      raise ValueError(f"{canonical_path(linear)[0]}: int4_packed needs an even input dim "
                       f"divisible by group_size={self.group_size}, got {fan_in}")
    codes = linear.param("codes", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               (in_axis, out_axis)),
                         (fan_in // 2, fan_out), jnp.int8)
    scales = linear.param("scales", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                 (None, out_axis)),
                          (n_scales, fan_out), jnp.float32)
    site = self.site(linear, None, "codes", fan_in, fan_out)
    hooks = hooks.with_context(providers=hooks.providers + (_PackedDot(self.kernels),))
    w = packed.PackedInt4(codes, scales, linear.param_dtype)
    x = x.astype(linear.dtype)
    return Matmul(site, hooks, parent=linear, name="dot_general")(x, w, _contract_last(x, w))


FORMS = {"dense": Dense, "low_rank": LowRank, "sparse_low_rank": SparseLowRank,
         "int4_packed": Int4Packed}


@dataclasses.dataclass(frozen=True)
class FormRule:
  """``pattern`` (fullmatch on the canonical path of a Linear) -> ``form``."""
  pattern: str
  form: str = "dense"
  options: tuple = ()  # (name, value) pairs passed to the form's constructor.

  def build(self, init_std: float) -> WeightForm:
    opts = dict(self.options)
    if self.form in ("low_rank", "sparse_low_rank"):
      opts.setdefault("init_std", init_std)
    return FORMS[self.form](**opts)


def form_rules(dicts, where: str = "config.model.weight_forms") -> tuple[FormRule, ...]:
  """FormRules from config dicts ``{pattern, form, **options}``, validated."""
  rules = []
  for i, d in enumerate(dicts or ()):
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    at = f"{where}[{i}]"
    pattern, form = d.pop("pattern", None), d.pop("form", "dense")
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"{at}.pattern={pattern!r} is not a regex: {e}") from None
    if form not in FORMS:
      raise ValueError(f"{at}.form={form!r}; use one of {sorted(FORMS)}")
    fields = {f.name for f in dataclasses.fields(FORMS[form])}
    for key in d:
      if key not in fields:
        raise ValueError(f"{at}.{key} is not an option of form {form!r}; options: "
                         f"{sorted(fields) or 'none'}")
    if form in ("low_rank", "sparse_low_rank") and not (isinstance(d.get("rank"), int)
                                                        and d["rank"] > 0):
      raise ValueError(f"{at}.rank={d.get('rank')!r}: {form} needs an int rank > 0")
    if form == "sparse_low_rank" and not 0 < d.get("density", 0.03) <= 1:
      raise ValueError(f"{at}.density={d['density']!r}: sparse_low_rank needs a density "
                       "in (0, 1] (SLTrain: 0.03)")
    if form == "sparse_low_rank" and not isinstance(d.get("merged", False), bool):
      raise ValueError(f"{at}.merged={d['merged']!r}: use True (one product x @ (A B + S)) or "
                       "False (three products, x A B + x S)")
    if form == "int4_packed":
      if not (isinstance(d.get("group_size", 0), int) and d.get("group_size", 0) >= 0):
        raise ValueError(f"{at}.group_size={d['group_size']!r}: int4_packed needs an int >= 0 "
                         "(0: per output channel)")
      if d.get("kernels", "auto") not in dispatch.KERNELS:
        raise ValueError(f"{at}.kernels={d['kernels']!r}: use one of {dispatch.KERNELS}")
    rules.append(FormRule(pattern=pattern, form=form, options=tuple(sorted(d.items()))))
  return tuple(rules)


def form_for(rules, path: str, init_std: float) -> WeightForm:
  for rule in rules:
    if re.fullmatch(rule.pattern, path):
      return rule.build(init_std)
  return Dense()

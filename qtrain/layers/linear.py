"""A dense layer whose weight form is chosen by path rules and whose matmul(s)
go through the one hook (see ``qtrain.layers.weights``).

An optional bias (``use_bias``: Qwen2's q/k/v projections) is added after the
form's product(s), outside the hook: quantizers, rotations and calibration see
the weight alone, as in a quantized kernel whose epilogue adds the bias in
high precision."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qtrain.layers.hooks import MatmulSite, as_hooks, canonical_path
from qtrain.layers.weights import Dense, form_for


def module_path(module: nn.Module) -> str:
  """The module's canonical path, e.g. ``decoder/layers/attn/q_proj`` (no
  scan/remat wrapper names, no layer index)."""
  return canonical_path(module)[0]


class Linear(nn.Module):
  """y = x W (+ b), W [in, out] (or the form's factors), b [out], annotated with
  logical axes (b's is W's output axis)."""
  features: int
  kernel_axes: tuple[str, str]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.02)
  hooks: Any = None  # Hooks, a Provider, a tuple of them, or None (plain dots).
  init_std: float = 0.02  # Scale of factorised forms' init (see weights.LowRank).
  use_bias: bool = False  # No param at all when off (bias-free checkpoints unchanged).

  @nn.compact
  def __call__(self, x):
    hooks = as_hooks(self.hooks)
    form = form_for(hooks.forms, module_path(self), self.init_std)
    if hooks.lhs_rotation is not None and not form.one_product:
      # Several products of x: rotate it once here, for all of them.
      x = hooks.lhs_rotation.apply(x)
      hooks = hooks.with_context(lhs_rotation=None)
    y = form(self, hooks, x)
    return y + _bias(self).astype(y.dtype) if self.use_bias else y


def _bias(module):
  """The ``bias`` [out] param of a Linear-like ``module`` (axis: its kernel's output axis)."""
  return module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           (module.kernel_axes[1],)),
                      (module.features,), module.param_dtype)


class DenseParams(nn.Module):
  """A dense ``Linear``'s params (``kernel`` [in, out]; ``bias`` [out] with
  ``use_bias``) at the Linear's own path, without its product:
  ``fused_dense`` reads several and multiplies once."""
  features: int
  kernel_axes: tuple[str, str]
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.02)
  use_bias: bool = False

  @nn.compact
  def __call__(self, fan_in: int):
    return Dense.kernel(self, fan_in), (_bias(self) if self.use_bias else None)


def projections(module: nn.Module, x, parts, *, fuse: bool, groups: int | None = None,
                use_bias: bool = False, **linear) -> list:
  """[x W_i (+ b_i)] for ``parts`` = ((name, features, kernel_axes), ...), the
  Linears ``module`` holds under those names (``linear``: the other fields of
  ``Linear``, ``hooks`` among them): one product (``fused_dense``) where
  ``fuse`` asks for it and the providers take the parts as one weight
  (``_joined_dot``), else each Linear. The same params either way."""
  dot = _joined_dot(linear.get("hooks"), module, parts, x.shape[-1]) if fuse else None
  if dot is not None:
    return fused_dense(module, x, parts, dot=dot, dtype=linear["dtype"],
                       param_dtype=linear["param_dtype"], kernel_init=linear["kernel_init"],
                       use_bias=use_bias, groups=groups)
  return [Linear(features, axes, use_bias=use_bias, name=name, **linear)(x)
          for name, features, axes in parts]


def _joined_dot(hooks, module: nn.Module, parts, fan_in: int):
  """The dot of the parts' joined weight (``Hooks.joined_dot_fn``), or None
  where they must run apart: a provider tells them apart (telemetry, a
  perturbation, a rotation, a quantizer other than one shared per-tensor
  fp8 one) or a part is not the dense form (a low-rank or packed rule)."""
  hooks = as_hooks(hooks)
  base, layer = canonical_path(module)
  if any(type(form_for(hooks.forms, f"{base}/{name}", 1.0)) is not Dense for name, _, _ in parts):
    return None
  sites = tuple(MatmulSite.at(f"{base}/{name}", layer, (*module.scope.path, name, "kernel"),
                              fan_in, features)
                for name, features, _ in parts)
  return hooks.joined_dot_fn(sites)


def fused_dense(module: nn.Module, x, parts, *, dot, dtype, param_dtype, kernel_init,
                use_bias: bool = False, groups: int | None = None) -> list:
  """[x W_1 (+ b_1), ..., x W_P (+ b_P)] for ``parts`` = ((name, features,
  kernel_axes), ...), as one matmul of x by the joined weight through
  ``dot`` (``_joined_dot``'s). With plain dots the function is the separate
  Linears' (each output the same dot product); a shared per-tensor fp8
  quantizer sees the joined weight as one tensor. The params are theirs
  (``DenseParams`` under their names: one params tree, checkpoint and
  sharding for both ways), and the
  product is one GEMM whose width is the sum (GQA's k/v projections are 256
  wide in llama_1b; cuBLAS runs one wide GEMM nearer its peak than several
  narrow ones, and the backward's dX is one GEMM instead of a sum of P).

  The joined weight keeps each part's split output axis whole, so no
  collective moves it under tensor parallelism: ``groups=None`` stacks
  equal-width parts innermost, [in, f, P] (gate/up: f splits over ``tensor``
  as each part's does; output j of every part side by side, so an elementwise
  op of the parts, SwiGLU's silu(g) * u and its backward, reads and writes
  them in one pass over contiguous memory: 1.7% less device time than
  [in, P, f] for llama_1b's gate/up forward + backward on an H100); ``groups=G`` cuts each part's outputs into G contiguous
  groups and joins them group by group, [in, G, sum_i f_i / G] (q/k/v with
  G = kv heads: the G axis splits as both heads axes do, where they do alike).
  """
  fan_in = x.shape[-1]
  made = [DenseParams(features, axes, param_dtype, kernel_init, use_bias, name=name)(fan_in)
          for name, features, axes in parts]
  ws = [jnp.asarray(kernel, dtype) for kernel, _ in made]
  if groups is None:
    w = jnp.stack(ws, axis=-1)
  else:
    w = jnp.concatenate([k.reshape(fan_in, groups, -1) for k in ws], axis=2)
  y = dot(module, x.astype(dtype), w, (((x.ndim - 1,), (0,)), ((), ())))
  if groups is not None:
    y = _cotangent_materialized(y)
  if groups is None:
    ys = [y[..., i] for i in range(len(parts))]
  else:
    cuts = np.cumsum([features // groups for _, features, _ in parts])[:-1]
    ys = [part.reshape(*x.shape[:-1], -1) for part in jnp.split(y, cuts, axis=-1)]
  return [y_i if b is None else y_i + b.astype(y_i.dtype) for y_i, (_, b) in zip(ys, made)]


# The grouped parts' cotangents reach the joined dot as one concatenate along
# its minor axis (q/k/v's RoPE backward, dk, dv). A quantized dot reads that
# gradient twice, for its per-tensor absmax and for its codes, and XLA fused
# the concatenate (RoPE backward included) into the absmax reduction, where it
# ran at a fifth of the copy's bandwidth (llama_1b fp8 step on an H100: 144 us
# per layer for 84 MB). An optimization barrier on the cotangent makes it one
# buffer, written once, that both read. Plain dots read it once (a GEMM
# cannot fuse its input), so for them nothing changes.


@jax.custom_vjp
def _cotangent_materialized(y):
  return y


def _cm_fwd(y):
  return y, None


def _cm_bwd(_, g):
  return (jax.lax.optimization_barrier(g),)


_cotangent_materialized.defvjp(_cm_fwd, _cm_bwd)

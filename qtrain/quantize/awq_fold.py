"""Where AWQ's per-input-channel scale s goes in the quantized model.

AWQ quantizes W' = diag(s) W ([in, out] kernels: row i times s_i) and must
feed that matmul x / s, so that (x / s) W' = x W before quantization and, with
quantized activations (W4A4), the activation quantizer sees x / s:

    y = Q_a(x diag(1/s)) Q_w(diag(s) W)

(dividing the dequantized weight by s instead, as a weight-only AWQ may, would
leave Q_a quantizing the unscaled x). Two ways to divide the input by s:

* **Folded** into the RMSNorm that produces x, exactly and at no run-time
  cost: gamma -> gamma / s. This needs every consumer of the norm's output to
  share s, so AWQ searches one s per group on the concatenated output
  channels (as the AWQ paper does): ``attn_norm`` -> q/k/v_proj,
  ``mlp_norm`` -> gate/up_proj, ``final_norm`` -> an untied lm_head. A group
  folds when all its matmuls are AWQ sites with one weight spec; the export's
  float params then hold gamma / s, a plain model checkpoint.
* **Explicit** for the other AWQ matmuls: ``InputScale`` multiplies their
  input by a stored per-channel 1/s before the activation quantizer (it is
  placed outermost among the providers). o_proj: s could fold into v_proj's
  output columns only as one s per kv head shared by all query heads of its
  group, and v is the KV quantizer's input, whose numerics the fold would
  change. down_proj: s folds exactly into up_proj's output columns, but
  up_proj is itself AWQ-quantized, so its search would have to follow
  down_proj's; not done yet. Their 1/s is the ``awq_scale`` the export stores.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from qtrain.layers import Provider

# (consumer module's parent, norm module) -> the matmul modules reading the norm.
NORM_CONSUMERS = {("attn", "attn_norm"): ("q_proj", "k_proj", "v_proj"),
                  ("mlp", "mlp_norm"): ("gate_proj", "up_proj")}


def _norm_of(param: tuple[str, ...]):
  """(norm scale's key path, the consumers' kernel key paths) for a dense
  kernel's key path, or None when its input is not a norm's output."""
  if param == ("lm_head", "kernel"):
    return ("final_norm", "scale"), (param,)
  if len(param) < 3 or param[-1] != "kernel":
    return None
  *prefix, parent, module, _ = param
  for (p, norm), consumers in NORM_CONSUMERS.items():
    if p == parent and module in consumers:
      return (*prefix, norm, "scale"), tuple((*prefix, parent, c, "kernel") for c in consumers)
  return None


def fold_groups(sites) -> list[tuple[tuple[str, ...] | None, list]]:
  """[(norm scale key path or None, sites)]: sites sharing a foldable norm
  (all its consumers are sites with one spec), and every other site alone."""
  by_param = {tuple(s.param): s for s in sites}
  groups, done = [], set()
  for s in sites:
    if s.path in done:
      continue
    norm = _norm_of(tuple(s.param))
    members = None if norm is None else [by_param.get(p) for p in norm[1]]
    if members and all(m is not None and m.spec == s.spec for m in members):
      groups.append((norm[0], members))
      done.update(m.path for m in members)
    else:
      groups.append((None, [s]))
      done.add(s.path)
  return groups


def _get(tree, key_path):
  for k in key_path:
    tree = tree[k]
  return tree


def folded_norms(qweights: dict, sites) -> dict:
  """{norm scale key path: s [D] or [L, D]} for the groups whose AWQ sites
  carry one shared s (a joint search); the rest stay explicit."""
  out = {}
  for norm, members in fold_groups(sites):
    scales = [qweights[m.path].awq_scale for m in members]
    if norm is None or any(a is None for a in scales):
      continue
    if all(np.array_equal(scales[0], a) for a in scales[1:]):
      out[norm] = scales[0][..., 0]
  return out


def explicit_scales(qweights: dict, sites) -> dict:
  """{site path: s [in, 1] or [L, in, 1]} of the AWQ sites not folded."""
  folded = {m.path for norm, members in fold_groups(sites)
            if norm in folded_norms(qweights, sites) for m in members}
  return {s.path: qweights[s.path].awq_scale for s in sites
          if qweights[s.path].awq_scale is not None and s.path not in folded}


def fold_into_norms(params, norms: dict):
  """A copy of ``params`` with each norm scale gamma replaced by gamma / s."""
  out = _copy(params)
  for key_path, s in norms.items():
    node = _get(out, key_path[:-1])
    gamma = node[key_path[-1]]
    s = np.asarray(s, np.float32)  # Host copy: gamma may live on the run's mesh.
    node[key_path[-1]] = (gamma.astype(jnp.float32) / s).astype(gamma.dtype)
  return out


def _copy(tree):
  return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


@dataclasses.dataclass(frozen=True, eq=False)
class InputScale(Provider):
  """Multiplies the input of each matmul in ``inv_scales`` ({site path as in
  ``WeightSite.path``: 1/s [in] or [L, in] for a scanned stack}) by 1/s along
  the contraction axis, before the providers below it (the activation
  quantizer) see it."""
  inv_scales: dict

  def dot(self, site, hooks, inner):
    path = site.module_path
    if path not in self.inv_scales:
      return inner
    inv = jnp.asarray(self.inv_scales[path])
    if site.stacked:  # [L, in]: this block's row (a traced index under nn.scan).
      inv = inv[hooks.layer]

    def scaled(module, lhs, rhs, dims, precision=None, preferred_element_type=None):
      axis = dims[0][0][0] % lhs.ndim
      shape = [1] * lhs.ndim
      shape[axis] = -1
      x = lhs * inv.reshape(shape).astype(lhs.dtype)
      return inner(module, x, rhs, dims, precision, preferred_element_type)
    return scaled


def input_scale_provider(qweights: dict, sites) -> InputScale | None:
  """The provider of the explicit 1/s of ``qweights`` (None when there are none)."""
  scales = explicit_scales(qweights, sites)
  if not scales:
    return None
  return InputScale({p: 1.0 / np.asarray(s, np.float32)[..., 0] for p, s in scales.items()})

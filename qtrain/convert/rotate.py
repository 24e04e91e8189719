"""Rotations fused into the weights: the rotated model is the same function.

SpinQuant's layout (Liu et al. 2024; QuaRot, Ashkboos et al. 2024; RoSTE,
Wei et al. 2025 rotate the same places), for orthogonal R1 [D, D],
R2 [H, H] per block, R4 [F, F] (R^-1 = R^T):

* R1, the residual stream. RMSNorm is x / rms(x) * g and rms(x R) = rms(x),
  so a norm commutes with R1 once its gain is 1: each gain g is first folded
  into the rows of the weights it feeds (W -> diag(g) W: q/k/v after
  attn_norm, gate/up after mlp_norm, the LM head after final_norm) and set
  to 1. Then the stream carries x R1: embedding E -> E R1, every weight that
  reads it W -> R1^T W (q/k/v/gate/up, LM head), every weight that writes it
  W -> W R1 (o_proj, down_proj).
* R2, per head on V/O: v_proj's columns of each KV head W_j -> W_j R2 (and
  its bias b_j -> b_j R2 with ``qkv_bias``), so V_j becomes V_j R2; attention mixes rows only, so each query head's output is
  rotated too, and o_proj's rows of each query head W_n -> R2^T W_n.
* R3, online on Q and K after RoPE: (Q R)(K R)^T = Q K^T; nothing to fuse.
* R4, online on the down_proj input h -> h R4: down_proj W -> R4^T W.

Tied embeddings: R1 alone keeps the tie (the head reads (E R1)^T = R1^T E^T),
but folding final_norm's per-channel gain into the head does not, so with R1
the fused model is *untied* (``lm_head`` = R1^T diag(g) E^T), exact, as
``merge_osp`` does for EmbProj. An OSP model (ssnorm, EmbProj, FFN Hadamard)
is merged into a plain Llama first (``qtrain.convert.osp.merge_osp``).

Hadamard kinds apply through the fast transform (``hadamard_transform``),
learned ones (Cayley, ``qtrain.layers.rotation.cayley``) as dense matrices
passed in; products in float32 at HIGHEST precision, stored in each param's
dtype. Only dense kernels fold; a factored weight form is refused, naming it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qtrain.convert.osp import is_plain, merge_osp, unwrap
from qtrain.layers.config import ModelConfig, RotationConfig
from qtrain.layers.param_tree import copy_tree, get, put
from qtrain.layers.rotation import check_rotation, hadamard_transform, signs_for

QUAROT = RotationConfig(r1="random_hadamard", r2="random_hadamard", r3="random_hadamard",
                        r4="random_hadamard")


class _Rot:
  """x R over the last axis for one orthogonal R (fast Hadamard or dense)."""

  def __init__(self, kind: str, n: int, signs=None, matrix=None):
    self.kind, self.n, self.signs, self.matrix = kind, n, signs, matrix

  def right(self, w):
    """w R (R acting on w's last axis), float32 in, float32 out."""
    w = jnp.asarray(w, jnp.float32)
    if self.kind == "learned":
      return jnp.matmul(w, jnp.asarray(self.matrix, jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    return hadamard_transform(w, self.signs)

  def right_t(self, w):
    """w R^T (the inverse rotation), float32 out."""
    w = jnp.asarray(w, jnp.float32)
    if self.kind == "learned":
      return jnp.matmul(w, jnp.asarray(self.matrix, jnp.float32).T,
                        precision=jax.lax.Precision.HIGHEST)
    return hadamard_transform(w, self.signs, inverse=True)

  def left(self, w, axis: int = -2):
    """R w, R acting on ``axis`` of w: (w^T R^T)^T."""
    return jnp.moveaxis(self.right_t(jnp.moveaxis(jnp.asarray(w), axis, -1)), -1, axis)

  def left_t(self, w, axis: int = -2):
    """R^T w, R^T acting on ``axis`` of w: (w^T R)^T."""
    return jnp.moveaxis(self.right(jnp.moveaxis(jnp.asarray(w), axis, -1)), -1, axis)


def _rot(rot: RotationConfig, which: str, n: int, matrix, layer: int = 0) -> _Rot:
  kind = getattr(rot, which)
  if kind == "learned":
    if matrix is None:
      raise ValueError(f"config.model.rotation.{which}='learned': pass its matrix "
                       f"(fuse_rotations(..., {which}=R), e.g. rotation.cayley(A))")
    m = np.asarray(matrix, np.float64)
    m = m[layer] if m.ndim == 3 else m
    if m.shape != (n, n) or not np.allclose(m @ m.T, np.eye(n), atol=1e-4):
      raise ValueError(f"the {which} matrix must be orthogonal [{n}, {n}], got {m.shape}")
    return _Rot(kind, n, matrix=m)
  return _Rot(kind, n, signs=signs_for(rot, which, n, layer))


def _blocks(params) -> list[tuple[str, int | None]]:
  """(key, None) for a scanned stack, (layers_i, i) per unscanned block."""
  dec = params["decoder"]
  if "layers" in dec:
    return [("layers", None)]
  return sorted(((k, int(k.split("_")[1])) for k in dec if k.startswith("layers_")),
                key=lambda kv: kv[1])


def _kernel(params, path):
  node = get(params, path)
  if set(node) - {"bias"} != {"kernel"}:  # q/k/v biases (Qwen2) sit on the output side.
    raise ValueError(f"{'/'.join(path)} holds {sorted(node)}, not a dense kernel: rotations "
                     "fold into dense weights only (config.model.weight_forms)")
  return node["kernel"]


def _update(params, path, fn, per_layer=None, leaf="kernel"):
  """Kernel (or ``leaf``) at ``path`` -> fn(it as float32), stored in its
  dtype; with ``per_layer`` (a scanned stack), fn(kernel[i], i) for each block i."""
  w = _kernel(params, path) if leaf == "kernel" else get(params, (*path, leaf))
  if per_layer is None:
    out = fn(w)
  else:
    out = jnp.stack([fn(w[i], i) for i in range(per_layer)])
  put(params, (*path, leaf), jnp.asarray(out).astype(w.dtype))


def _fold_norms(params, cfg: ModelConfig) -> None:
  """Each RMSNorm gain into the rows of the weights it feeds; gains -> 1."""
  for key, _ in _blocks(params):
    base = ("decoder", key)
    for norm, names in (("attn_norm", ("attn", ("q_proj", "k_proj", "v_proj"))),
                        ("mlp_norm", ("mlp", ("gate_proj", "up_proj")))):
      g = jnp.asarray(get(params, (*base, norm, "scale")), jnp.float32)
      for name in names[1]:
        _update(params, (*base, names[0], name), lambda w, g=g: w * g[..., :, None])
      put(params, (*base, norm, "scale"), jnp.ones_like(get(params, (*base, norm, "scale"))))
  g = jnp.asarray(params["final_norm"]["scale"], jnp.float32)
  if cfg.tie_embeddings:  # The head reads E^T; diag(g) E^T is no longer the table.
    table = params["embedding"]
    params["lm_head"] = {"kernel": (jnp.asarray(table, jnp.float32).T * g[:, None]
                                    ).astype(table.dtype)}
  else:
    _update(params, ("lm_head",), lambda w: w * g[:, None])
  params["final_norm"]["scale"] = jnp.ones_like(params["final_norm"]["scale"])


def _fuse_r1(params, r1: _Rot) -> None:
  table = params["embedding"]
  params["embedding"] = r1.right(table).astype(table.dtype)  # E R1.
  for key, _ in _blocks(params):
    for path in (("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"),
                 ("mlp", "gate_proj"), ("mlp", "up_proj")):  # Readers: R1^T W.
      _update(params, ("decoder", key, *path), r1.left_t)
    for path in (("attn", "o_proj"), ("mlp", "down_proj")):  # Writers: W R1.
      _update(params, ("decoder", key, *path), r1.right)
  _update(params, ("lm_head",), r1.left_t)


def _per_block(params, cfg: ModelConfig, on: tuple[bool, ...], path, fn,
               leaf: str = "kernel") -> None:
  """fn(kernel (or ``leaf``), layer) on each block whose ``on`` entry is True."""
  for key, i in _blocks(params):
    full = ("decoder", key, *path)
    if i is None:
      _update(params, full, lambda w, j: fn(w, j) if on[j] else w, per_layer=cfg.n_layers,
              leaf=leaf)
    elif on[i]:
      _update(params, full, lambda w, i=i: fn(w, i), leaf=leaf)


def _fuse_r2(params, cfg: ModelConfig, rot: RotationConfig, matrix) -> None:
  N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  on = rot.blocks("r2", cfg.n_layers)

  def v(w, i):  # [D, K*H] (or the bias [K*H]): each KV head's columns W_j -> W_j R2.
    return _rot(rot, "r2", H, matrix, i).right(w.reshape(*w.shape[:-1], K, H)).reshape(w.shape)

  def o(w, i):  # [N*H, D]: each query head's rows W_n -> R2^T W_n.
    return _rot(rot, "r2", H, matrix, i).left_t(w.reshape(N, H, -1)).reshape(N * H, -1)
  _per_block(params, cfg, on, ("attn", "v_proj"), v)
  if cfg.qkv_bias:  # V = x W + b: b rotates with W's columns.
    _per_block(params, cfg, on, ("attn", "v_proj"), v, leaf="bias")
  _per_block(params, cfg, on, ("attn", "o_proj"), o)


def _fuse_r4(params, cfg: ModelConfig, rot: RotationConfig) -> None:
  r4 = _rot(rot, "r4", cfg.d_ff, None)  # One R4 for all blocks (the online one).
  _per_block(params, cfg, rot.blocks("r4", cfg.n_layers), ("mlp", "down_proj"),
             lambda w, i: r4.left_t(w))


def rotated_config(cfg: ModelConfig, rotation: RotationConfig | dict | str = "quarot"
                   ) -> ModelConfig:
  """The ModelConfig that ``fuse_rotations(params, cfg, rotation)`` returns,
  checked (ValueError naming the field), without touching params."""
  rot = QUAROT if rotation == "quarot" else RotationConfig.of(rotation)
  if cfg.rotation != RotationConfig():
    raise ValueError(f"config.model.rotation={cfg.rotation} is on already: the params hold "
                     "its rotations; fusing again would rotate twice")
  out = dataclasses.replace(  # merge_osp's plain Llama, then the rotations.
      cfg, norm="rmsnorm", embproj=False, ffn_hadamard=False, rotation=rot,
      tie_embeddings=cfg.tie_embeddings and not cfg.embproj and rot.r1 == "none")
  check_rotation(out)
  return out


def fuse_rotations(params, cfg: ModelConfig, rotation: RotationConfig | dict | str = "quarot",
                   *, r1=None, r2=None) -> tuple[dict, ModelConfig]:
  """(params, cfg) of a model without rotations -> the same function with
  ``rotation``'s R1/R2 fused into the weights and its R3/R4 on (online), the
  R4^T fused into down_proj. ``rotation``: a RotationConfig, its dict, or
  "quarot" (every rotation a random Hadamard). ``r1`` / ``r2``: the matrices
  of learned rotations ([D, D]; [H, H] or [L, H, H]).

  ``params``: boxed or plain, wrapped or not; returned plain and unwrapped
  (untouched leaves shared). The returned cfg (``rotated_config``) is a plain
  Llama (norm rmsnorm, no EmbProj or FFN Hadamard; untied when R1 is fused
  with tied embeddings) with ``rotation`` recorded.
  """
  out = rotated_config(cfg, rotation)
  rot = out.rotation
  params = copy_tree(unwrap(params))
  if not is_plain(cfg):
    params, cfg = merge_osp(params, cfg)
  if rot.r1 != "none":
    _fold_norms(params, cfg)
    _fuse_r1(params, _rot(rot, "r1", cfg.d_model, r1))
  if rot.r2 != "none":
    _fuse_r2(params, cfg, rot, r2)
  if rot.r4 != "none":
    _fuse_r4(params, cfg, rot)
  return params, out


def drop_online(params, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """(params, cfg) with online R3/R4 -> the same function without them, for
  an exporter whose model has no online rotation (HF Llama): R3 drops out
  (Q K^T is the same), down_proj W' = R4^T W goes back to R4 W'. R1/R2 stay
  fused (they are plain weights). ``params`` plain or boxed, wrapped or not."""
  rot = cfg.rotation
  params = copy_tree(unwrap(params))
  if rot.r4 != "none":
    r4 = _rot(rot, "r4", cfg.d_ff, None)
    _per_block(params, cfg, rot.blocks("r4", cfg.n_layers), ("mlp", "down_proj"),
               lambda w, i: r4.left(w))
  return params, dataclasses.replace(cfg, rotation=dataclasses.replace(
      rot, r3="none", r3_layers=None, r4="none", r4_layers=None, save=False))


"""The decoder's hyper-parameters as one frozen dataclass.

Dimension letters used in array names throughout ``qtrain.layers``:

  B batch, T query length, S key/value length, D model width (``d_model``),
  N query heads, K key/value heads, G = N // K query heads per KV head,
  H head width, F feed-forward width, V (padded) vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str) -> Any:
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """Llama-3 frequency scaling of RoPE (disabled when ``factor`` is 1)."""
  factor: float = 1.0  # 1 disables scaling.
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


# Kinds of rotation (qtrain/layers/rotation.py): fused ones may be learned
# (a Cayley rotation, its matrix handed to qtrain.convert.rotate); online ones
# are fast transforms.
FUSED_ROTATIONS = ("none", "hadamard", "random_hadamard", "learned")
ONLINE_ROTATIONS = ("none", "hadamard", "random_hadamard")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RotationConfig:
  """SpinQuant's rotations (Liu et al. 2024; QuaRot, RoSTE use the same places).

  R1 and R2 are fused into the weights by ``qtrain.convert.rotate.fuse_rotations``
  and never applied by the model: here they record what the params hold.
  R3 and R4 are applied online by the layers (``rotation.online``). Blocks:
  ``*_layers`` None or "all" = every block, else the block indices (an int, a
  sequence, or "0-3,7"), resolved per block under ``nn.scan`` by a table.
  """
  # Residual stream, D x D: the embedding, q/k/v/gate/up inputs, o/down
  # outputs, the LM head.
  r1: str = "none"
  r2: str = "none"  # Per head on V (v_proj outputs) and O (o_proj inputs), H x H.
  r2_layers: Any = None
  r3: str = "none"  # Online on Q and K after RoPE (over head_dim): Q K^T unchanged.
  r3_layers: Any = None
  # Online on the down_proj input (over d_ff), R^T fused into down_proj.
  # "hadamard" on every block is ``ffn_hadamard`` (OSP) for power-of-two d_ff.
  r4: str = "none"
  r4_layers: Any = None
  seed: int = 0  # Signs of the random_hadamard kinds.
  # How R3/R4 run (rotation.hadamard_transform): fwht (butterfly + m x m
  # matmul) | matmul (one small matmul per Kronecker factor).
  impl: str = "matmul_bf16"  # Fastest on an H100 (docs/benchmarks.md, rotations); fwht | matmul | matmul_bf16.
  # Remat also saves the rotated tensors (rotation.remat_policy): no transform reruns in the backward.
  save: bool = False
  # R4's backward through down_proj's weight (rotation.Online): dy (R W)^T
  # instead of R^T on the [tokens, d_ff] cotangent, where exact (see there).
  fold_grad: bool = True

  @classmethod
  def of(cls, d) -> "RotationConfig":
    """From a dict / ConfigDict / RotationConfig; block lists become sorted tuples."""
    if isinstance(d, cls):
      return d
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"config.model.rotation.{unknown[0]} is not a rotation field; known: "
                       f"{[f.name for f in dataclasses.fields(cls)]}")
    from qtrain.quant.rules import parse_layers  # pylint: disable=g-import-not-at-top
    for k in ("r2_layers", "r3_layers", "r4_layers"):
      if d.get(k) == "all":  # A string default keeps command-line overrides typed.
        d[k] = None
      if d.get(k) is not None:
        d[k] = tuple(sorted(parse_layers(d[k], f"config.model.rotation.{k}")))
    return cls(**d)

  def blocks(self, which: str, n_layers: int) -> tuple[bool, ...]:
    """Per block, whether rotation ``which`` ('r2' | 'r3' | 'r4') is on."""
    if getattr(self, which) == "none":
      return (False,) * n_layers
    layers = getattr(self, f"{which}_layers")
    return tuple(layers is None or i in layers for i in range(n_layers))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """A Llama-family decoder (Llama, Qwen2 with ``qkv_bias``)."""
  vocab_size: int  # V: may exceed the tokenizer's vocabulary (padding).
  d_model: int  # D
  n_layers: int  # L
  n_heads: int  # N
  n_kv_heads: int  # K; N % K == 0 (grouped-query attention).
  head_dim: int  # H
  d_ff: int  # F
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  tie_embeddings: bool = False
  norm_eps: float = 1e-5
  # Biases on the q/k/v projections (Qwen2; o_proj and the MLP have none).
  qkv_bias: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"  # Compute dtype of matmuls and activations.
  scan_layers: bool = True
  # Blocks per iteration of the scanned stack's loop (1: a loop of n_layers
  # iterations; 0 or >= n_layers: no loop). The params keep their [L, ...]
  # layout either way; unrolled, each block's saved activations are separate
  # buffers instead of slices of an [L, ...] stack that XLA fills by copying
  # (llama_1b on an H100: +7.3% tokens/s, +4.9 GiB; docs/benchmarks.md).
  scan_unroll: int = 1
  remat_policy: str = "none"  # See qtrain.layers.decoder.REMAT_POLICIES.
  # The dots policies also keep the int8/fp8 matmuls' operand codes and
  # scales (qtrain.quant.dot_general.QUANT_CODES): no second quantization of
  # X and W in the backward, for 1 byte per element of each matmul input.
  save_quant_codes: bool = False
  # q/k/v (fused_qkv) and gate/up (fused_mlp) each as one matmul where every
  # matmul is a plain dot (no quantizer, telemetry, rotation or non-dense form;
  # else the separate ones, the same function): same params, one wider GEMM
  # (qtrain.layers.linear.fused_dense).
  fused_qkv: bool = False
  fused_mlp: bool = False
  attention_impl: str = "auto"  # auto | xla | cudnn
  # Most packed segments per row the cuDNN path describes (0 = T, exact but
  # cuDNN's workspace grows with it: T=2048 asked for 536 GiB on an H100).
  attention_max_segments: int = 16
  # With config.mesh.sequence > 1: none (XLA gathers K/V implicitly) | ring
  # (K/V chunks passed around the sequence ring) | all_gather (K/V gathered
  # explicitly). qtrain/parallel/context_parallel.py.
  context_parallel: str = "none"
  init_std: float = 0.02
  # Weight forms by path (qtrain.layers.weights.FormRule); none matching: dense.
  weight_forms: tuple = ()
  # Outlier-safe pretraining (OSP, Park et al. 2025); qtrain.convert.osp.merge_osp
  # folds all three into a plain Llama. Every norm (attn, mlp, final): rmsnorm
  # (gain [D]) | ssnorm (Single-Scale RMSNorm: one scalar gain, [L] when scanned).
  norm: str = "rmsnorm"
  # EmbProj: orthogonally initialised d x d matrices embed_proj (after the
  # lookup) and head_proj (after the final norm, before the LM head).
  embproj: bool = False
  # Normalised fast Walsh-Hadamard transform of the down_proj input (after the
  # mlp_hidden site; d_ff a power of two); hadamard.fold_ffn_hadamard turns it
  # on in a model trained without it.
  ffn_hadamard: bool = False
  # Rotations for quantization (RotationConfig): R1/R2 fused, R3/R4 online.
  rotation: RotationConfig = RotationConfig()
  # The loss's LM head + cross-entropy in this many chunks of each row's
  # tokens, each rematerialised in the backward, so no [B, T, V] float32
  # logits are kept (qtrain.train.loss); 0 = off (one [B, T, V] head call).
  loss_chunks: int = 0

  @property
  def compute_dtype(self):
    return dtype_from_name(self.dtype)

  @property
  def weight_dtype(self):
    return dtype_from_name(self.param_dtype)

  @classmethod
  def of(cls, m) -> "ModelConfig":
    """``m`` itself, or the ModelConfig of ``config.model`` (a ConfigDict or dict)."""
    if isinstance(m, cls):
      return m
    return cls.from_dict(m.to_dict() if hasattr(m, "to_dict") else dict(m))

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    d = dict(d)
    d["rope_scaling"] = RopeScaling(**dict(d.get("rope_scaling", {})))
    d["rotation"] = RotationConfig.of(d.get("rotation", {}))
    from qtrain.layers.weights import form_rules  # pylint: disable=g-import-not-at-top
    d["weight_forms"] = form_rules(d.get("weight_forms", ()))
    return cls(**d)

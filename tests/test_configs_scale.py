"""configs/llama_8b.py: the Llama-3-8B parameter count from the traced model
(nothing allocated) against the published figure and a closed form of the
shape, its mesh checks, and one FSDP step of its smoke variant on 8 devices."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import llama_8b
from qtrain.config import ConfigError, validate
from qtrain.optim import build_optimizer
from qtrain.parallel import Layout, batch_sharding
from qtrain.train.build import build_model
from qtrain.train.state import abstract_params, abstract_state, init_state, state_shardings
from qtrain.train.step import make_steps

LLAMA3_8B_PARAMS = 8_030_261_248  # Meta's model card / HF safetensors index of Llama-3-8B.


def _closed_form_params(m) -> int:
  """Embedding + untied LM head + L x (q, k, v, o, gate/up/down, 2 norms) +
  the final norm, from the shape alone."""
  attn = m.d_model * m.n_heads * m.head_dim * 2 + m.d_model * m.n_kv_heads * m.head_dim * 2
  block = attn + 3 * m.d_model * m.d_ff + 2 * m.d_model
  embeddings = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
  return embeddings + m.n_layers * block + m.d_model


def test_llama_8b_has_the_published_parameter_count():
  cfg = llama_8b.get_config()
  m = cfg.model
  # The init is traced under jax.eval_shape: 32 GB of float32 params are
  # never allocated. The sequence length does not change the params.
  boxed = abstract_params(build_model(cfg), 8)
  shapes = [x.value for x in
            jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))]
  count = sum(math.prod(s.shape) for s in shapes)
  assert count == LLAMA3_8B_PARAMS  # Exact: one missing bias or norm would show.
  assert _closed_form_params(m) == LLAMA3_8B_PARAMS
  assert {s.dtype for s in shapes} == {np.dtype("float32")}
  # What the count does not see: the attention layout and RoPE.
  assert (m.n_heads, m.n_kv_heads, m.head_dim, m.rope_theta, m.rope_scaling.factor,
          m.max_seq_len) == (32, 8, 128, 500000.0, 1.0, 8192)


@pytest.mark.parametrize("variant", ["", "smoke"])
def test_llama_8b_validates_with_fsdp_over_8_devices(variant):
  validate(llama_8b.get_config(variant), n_devices=8)


@pytest.mark.parametrize("mesh, n_devices, message", [
    (dict(tensor=3), 24, "config.mesh.tensor=3 does not divide config.model.n_heads=32"),
    (dict(), 3, "config.mesh.fsdp=3 does not divide config.model.d_model=4096"),
    (dict(), 16, "config.data.global_batch_size=8 is not a positive multiple of config.mesh.data"
                 " x fsdp = 16"),
    (dict(fsdp=4), 8, "config.mesh (fsdp=4) multiplies to 4 but there are 8 devices"),
])
def test_llama_8b_wrong_mesh_names_the_field(mesh, n_devices, message):
  cfg = llama_8b.get_config()
  cfg.mesh.update(**mesh)
  with pytest.raises(ConfigError) as e:
    validate(cfg, n_devices=n_devices)
  assert message in str(e.value)


def test_llama_8b_smoke_trains_a_step_with_fsdp_on_8_devices():
  cfg = llama_8b.get_config("smoke")
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  validate(cfg, n_devices=8)
  seq, b = cfg.data.seq_len, cfg.data.global_batch_size
  model = build_model(cfg)
  layout = Layout.from_config(cfg)
  assert layout.mesh.shape["fsdp"] == 8
  with layout:
    tx = build_optimizer(cfg, abstract_params(model, seq))
    sh = state_shardings(model, tx, layout.mesh, seq)
    state = init_state(model, tx, layout.mesh, cfg.seed, seq)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (b, seq + 1))
    batch = {k: jax.device_put(v.astype(np.int32), batch_sharding(layout.mesh))
             for k, v in (("inputs", tokens[:, :-1]), ("targets", tokens[:, 1:]))}
    train, _ = make_steps(cfg, model, tx, layout.mesh, sh, batch_keys=tuple(batch))
    state, metrics = train(state, batch)
  # FSDP: every device holds 1/8 of the embedding's model width (and of its
  # AdamW moments), not a replica.
  emb = state.params["embedding"]
  assert emb.addressable_shards[0].data.shape == (cfg.model.vocab_size, cfg.model.d_model // 8)
  assert int(state.step) == 1 and bool(metrics["finite"])
  # At init (std 0.02) the logits are near zero, so the loss is near the
  # uniform cross-entropy ln V; 0.1 allows the logits' small spread
  # (E[CE] - ln V ~ var(logits) / 2 ~ 0.03 here).
  assert abs(float(metrics["loss"]) - math.log(cfg.model.vocab_size)) < 0.1


def test_llama_8b_adamw_state_takes_16_bytes_per_param():
  """benchmarks/scaling.py's breakdown of the abstract train state (nothing
  allocated) against 8,030,261,248 x (4 B params + 4 B grads + 8 B AdamW
  moments): 119.7 GiB before any activation, more than an H100 holds (the
  benchmark's compile-only 8b_1gpu variant says what an H200 would need)."""
  from benchmarks.scaling import state_breakdown  # pylint: disable=g-import-not-at-top
  cfg = llama_8b.get_config()
  cfg.mesh.update(fsdp=1)
  model = build_model(cfg)
  layout = Layout.from_config(cfg, devices=jax.devices()[:1])
  with layout:
    tx = build_optimizer(cfg, abstract_params(model, 8))
    got = state_breakdown(abstract_state(model, tx, layout.mesh, 8))
  assert got["params"] == LLAMA3_8B_PARAMS
  # AdamW's step count (one int32 per group) is the only extra optimizer byte.
  assert got["bytes_per_param"] == {"params": 4.0, "grads": 4.0, "optimizer": 8.0}
  assert got["state_and_grads_gib"] == pytest.approx(16 * LLAMA3_8B_PARAMS / 2**30, abs=1e-3)


def test_scaling_summary_is_weak_scaling_efficiency():
  """Efficiency = tokens/s on N GPUs / (N x tokens/s on 1); a failed variant
  is left out, not counted as zero."""
  from benchmarks.scaling import summarize  # pylint: disable=g-import-not-at-top
  run = lambda v, tok: {"variant": v, "tokens_per_s": tok, "tokens_per_s_per_gpu": tok,
                        "mfu": 0.5, "peak_mem_gib": [1.0], "remat": "full"}
  rows = [run("1gpu", 1000.0), run("dp2", 1900.0), run("fsdp2", 1500.0),
          {"variant": "tp2", "error": "RESOURCE_EXHAUSTED", "oom": True}]
  got = summarize(rows, 2)
  assert got["efficiency"] == {"dp2": 0.95, "fsdp2": 0.75}

"""HF Qwen2 <-> qtrain, against transformers itself (the reference).

A tiny random ``Qwen2ForCausalLM`` (GQA, non-zero q/k/v biases, tied and
untied, default and Llama-3-scaled RoPE) is converted and both frameworks'
float32 logits compared; the export goes back through safetensors + config.json
into ``transformers.AutoModelForCausalLM`` and must give the same logits. The
Llama path is covered by tests/test_convert.py (unchanged, still passing).
"""

import json

import flax
import jax
import numpy as np
import pytest
import torch
import transformers

from qtrain.convert import (config_from_hf, config_to_hf, load_hf_checkpoint,
                            params_from_hf_model, params_from_hf_state_dict,
                            params_to_hf_state_dict, save_hf_checkpoint)
from hf_util import hf_logits, numpy_state_dict, qtrain_logits, randomize
from qtrain.layers import Transformer

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

V, T, B = 256, 32, 2
LLAMA3 = {"rope_type": "llama3", "rope_theta": 1000000.0, "factor": 8.0,
          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
DEFAULT = {"rope_type": "default", "rope_theta": 1000000.0}
# float32 on both sides; only the accumulation order of matmuls and reductions
# over D=64/F=160 differs (plus float64- vs float32-computed inverse
# frequencies), ~10 ulps of logits of |max| ~5, std ~1.2: measured max |diff|
# 4.4e-6..4.5e-6 with default RoPE, 7.7e-6..8.6e-6 with Llama-3 scaling
# (tied/untied), so 1e-4 leaves >10x margin, while a wrong bias mapping
# (biases ~N(0, 0.5)) moves logits by O(1) (test_biases_matter).
LOGIT_ATOL = 1e-4


def qwen2(tied: bool, scaling: bool = False, seed: int = 0, vocab: int = V):
  config = transformers.Qwen2Config(
      vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=160, max_position_embeddings=64,
      rope_parameters=dict(LLAMA3 if scaling else DEFAULT), tie_word_embeddings=tied,
      rms_norm_eps=1e-6, attn_implementation="eager")
  torch.manual_seed(seed)
  return randomize(transformers.Qwen2ForCausalLM(config).float().eval(), bias_std=0.5)


def tokens(seed: int = 1):
  return np.random.default_rng(seed).integers(0, V, (B, T), dtype=np.int32)



@pytest.mark.parametrize("scan,tied", [(True, False), (False, True)],
                         ids=["scan-untied", "unscanned-tied"])
def test_logits_match_transformers(tied, scan):
  model = qwen2(tied)
  cfg = config_from_hf(model.config, scan_layers=scan)
  assert cfg.qkv_bias and cfg.tie_embeddings == tied
  assert (cfg.rope_theta, cfg.norm_eps, cfg.n_kv_heads) == (1e6, 1e-6, 2)
  params = params_from_hf_model(model, cfg)
  attn = params["decoder"]["layers" if scan else "layers_1"]["attn"]
  assert set(attn["k_proj"]) == {"kernel", "bias"} and set(attn["o_proj"]) == {"kernel"}
  ref = hf_logits(model, tokens())
  np.testing.assert_allclose(qtrain_logits(cfg, params, tokens()), ref, rtol=0, atol=LOGIT_ATOL)


def test_llama3_rope_scaling():
  model = qwen2(tied=False, scaling=True)
  cfg = config_from_hf(model.config)
  assert cfg.rope_scaling.factor == 8.0
  np.testing.assert_allclose(qtrain_logits(cfg, params_from_hf_model(model, cfg), tokens()),
                             hf_logits(model, tokens()), rtol=0, atol=LOGIT_ATOL)


def test_biases_matter():
  """Zeroing the imported biases moves the logits far beyond the tolerance:
  the match above is not one a bias-free model would pass too."""
  model = qwen2(tied=True)
  cfg = config_from_hf(model.config)
  params = params_from_hf_model(model, cfg)
  for n in "qkv":
    params["decoder"]["layers"]["attn"][f"{n}_proj"]["bias"] *= 0
  assert np.abs(qtrain_logits(cfg, params, tokens()) - hf_logits(model, tokens())).max() > 0.1


def _param_paths(cfg):
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens())["params"]
  return {"/".join(k) for k in flax.traverse_util.flatten_dict(flax.linen.unbox(shapes))}


def test_llama_path_has_no_bias_param():
  """Without qkv_bias the param tree is the Llama one, key for key; with it,
  exactly q/k/v gain a bias."""
  llama = config_from_hf(transformers.LlamaConfig(
      vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=160, tie_word_embeddings=True))
  qwen = config_from_hf(qwen2(tied=True).config)
  assert not llama.qkv_bias and not [p for p in _param_paths(llama) if "bias" in p]
  assert _param_paths(qwen) - _param_paths(llama) == {
      f"decoder/layers/attn/{n}_proj/bias" for n in "qkv"}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_state_dict_round_trip(tied):
  model = qwen2(tied)
  state_dict = numpy_state_dict(model)
  cfg = config_from_hf(model.config)
  exported = params_to_hf_state_dict(params_from_hf_state_dict(state_dict, cfg), cfg)
  assert sorted(exported) == sorted(state_dict)
  for k, v in state_dict.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)


@pytest.mark.parametrize("shard,tied,scaling", [(False, True, False), (True, False, True)],
                         ids=["single_tied", "sharded_untied_llama3"])
def test_export_loads_into_transformers(tmp_path, shard, tied, scaling):
  """save_hf_checkpoint -> AutoModelForCausalLM.from_pretrained: the class,
  config and logits are the original model's (bit-equal: same float32 weights,
  same torch code)."""
  model = qwen2(tied, scaling)
  cfg = config_from_hf(model.config)
  params = params_from_hf_model(model, cfg)
  save_hf_checkpoint(tmp_path, params, cfg, max_shard_bytes=100_000 if shard else 2**30)
  assert (tmp_path / "model.safetensors.index.json").exists() == shard
  loaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager").float().eval()
  assert type(loaded) is transformers.Qwen2ForCausalLM
  assert loaded.config.tie_word_embeddings == tied
  np.testing.assert_array_equal(hf_logits(loaded, tokens()), hf_logits(model, tokens()))
  cfg2, params2 = load_hf_checkpoint(tmp_path)  # And back again: the same qtrain model.
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_config_to_hf_is_a_transformers_config():
  model = qwen2(tied=True, scaling=True)
  cfg = config_from_hf(model.config)
  doc = config_to_hf(cfg)
  hf = transformers.AutoConfig.for_model(**json.loads(json.dumps(doc)))
  assert isinstance(hf, transformers.Qwen2Config)
  assert config_from_hf(hf) == cfg
  for key in ("hidden_size", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings"):
    assert getattr(hf, key) == getattr(model.config, key), key


def test_config_errors():
  base = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=160)
  with pytest.raises(ValueError, match=r"model_type='mistral'; qtrain converts 'llama' and "
                                       r"'qwen2' only"):
    config_from_hf(dict(base, model_type="mistral"))
  with pytest.raises(ValueError, match="use_sliding_window=True"):
    config_from_hf(dict(base, model_type="qwen2", use_sliding_window=True))
  assert config_from_hf(dict(base, model_type="qwen2")).qkv_bias
  assert not config_from_hf(dict(base, model_type="llama")).qkv_bias


# --- export of models trained in qtrain ------------------------------------------

def _random_qtrain_params(cfg, seed=0):
  """Params of ``cfg``'s shapes: weights and biases N(0, 0.15), norm gains
  1 + 0.3 N(0, 1) (scalars for ssnorm), so every piece moves logits by O(1)."""
  shapes = flax.linen.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                                           tokens()))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, s):
    gain = jax.tree_util.keystr(path).endswith("['scale']")
    return (1.0 * gain + (0.3 if gain else 0.15) * rng.standard_normal(s.shape)).astype(s.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("qkv_bias,osp", [(True, True), (False, True), (True, False)],
                         ids=["qwen2_osp", "llama_osp", "qwen2_llama3_untied"])
def test_qtrain_model_exports_to_transformers(tmp_path, qkv_bias, osp):
  """A model trained in qtrain (OSP: Single-Scale norms, EmbProj with tied
  embeddings, FFN Hadamard; or plain with Llama-3 RoPE) saved by
  save_hf_checkpoint: transformers loads the family its biases say, with the
  config it needs (EmbProj unties the head), and computes qtrain's logits.
  Tolerance as above: float32 both sides, the merges adding a few ulps;
  measured max |diff| 5.4e-6..7.5e-6 on logits of |max| ~6."""
  from qtrain.layers import ModelConfig, RopeScaling  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                    d_ff=128, max_seq_len=64, rope_theta=1e6, norm_eps=1e-6, qkv_bias=qkv_bias,
                    tie_embeddings=osp, norm="ssnorm" if osp else "rmsnorm", embproj=osp,
                    ffn_hadamard=osp,
                    rope_scaling=RopeScaling() if osp else RopeScaling(
                        factor=8.0, original_max_position=16))
  params = _random_qtrain_params(cfg)
  plain = save_hf_checkpoint(tmp_path, {"params": params}, cfg)
  assert not plain.tie_embeddings  # Tied + EmbProj merges into an untied head; plain stays.
  loaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager").float().eval()
  assert type(loaded) is (transformers.Qwen2ForCausalLM if qkv_bias
                          else transformers.LlamaForCausalLM)
  assert loaded.config.tie_word_embeddings is False
  want = qtrain_logits(cfg, params, tokens())
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(hf_logits(loaded, tokens()), want, rtol=0, atol=LOGIT_ATOL)


def test_bfloat16_export(tmp_path):
  """--dtype=bfloat16: safetensors of bf16 (as HF checkpoints ship) that
  transformers loads as such; the values are the float32 weights rounded."""
  model = qwen2(tied=False)
  cfg = config_from_hf(model.config)
  save_hf_checkpoint(tmp_path, params_from_hf_model(model, cfg), cfg, dtype="bfloat16")
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  bias = loaded.model.layers[1].self_attn.q_proj.bias
  assert bias.dtype == torch.bfloat16
  np.testing.assert_array_equal(
      bias.detach().float().numpy(), model.model.layers[1].self_attn.q_proj.bias.detach()
      .to(torch.bfloat16).float().numpy())
  with pytest.raises(ValueError, match="dtype='float16'; export float32 or bfloat16"):
    save_hf_checkpoint(tmp_path / "x", params_from_hf_model(model, cfg), cfg, dtype="float16")


def test_qkv_bias_on_fsdp_tensor_mesh_equals_one_device():
  """The bias carries its kernel's output axis: split over tensor like the
  heads it adds to, and loss and grads equal the one-device run's."""
  from jax.sharding import PartitionSpec  # pylint: disable=g-import-not-at-top
  from parallel_util import (Run, assert_matches_one_device, batch,  # pylint: disable=g-import-not-at-top
                             smoke_config)
  one, mesh = smoke_config(), smoke_config(data=2, fsdp=2, tensor=2)
  for cfg in (one, mesh):
    cfg.model.qkv_bias = True
  ref = Run(one)
  params = ref.init_state().params
  rng = np.random.default_rng(0)
  for n in "qkv":  # Non-zero biases, so they shape the loss too.
    b = params["decoder"]["layers"]["attn"][f"{n}_proj"]["bias"]
    params["decoder"]["layers"]["attn"][f"{n}_proj"]["bias"] = jax.numpy.asarray(
        0.5 * rng.standard_normal(b.shape), b.dtype)
  run = Run(mesh)
  for n in "qkv":
    assert run.state_sh.params["decoder"]["layers"]["attn"][f"{n}_proj"]["bias"].spec == (
        PartitionSpec(None, "tensor"))
  loss, grads, _ = run.loss_and_grads(params, batch())
  ref_loss, ref_grads, _ = ref.loss_and_grads(params, batch())
  assert_matches_one_device(loss, grads, ref_loss, ref_grads)
  assert np.abs(ref_grads["decoder"]["layers"]["attn"]["v_proj"]["bias"]).max() > 0


def test_quarot_rotation_of_a_qwen2_keeps_the_function():
  """QuaRot (R1/R2 fused, R3/R4 online) on a Qwen2: R2 rotates v_proj's bias
  with its columns (V = x W + b -> V R2 = x W R2 + b R2); R1 and the folded
  norm gains act on the input side and leave biases alone. Rotated logits =
  the model's within 1e-5 of max |logit| (tests/test_rotation.py's bound:
  float32 rounding of exact rotations), and the HF export (online rotations
  dropped) gives transformers the original logits within LOGIT_ATOL."""
  from qtrain.convert import fuse_rotations  # pylint: disable=g-import-not-at-top
  model = qwen2(tied=False)
  cfg = config_from_hf(model.config)
  params = params_from_hf_model(model, cfg)
  traced = {}

  def fuse(p):
    fused, traced["cfg"] = fuse_rotations(p, cfg, "quarot")
    return fused
  fused = jax.jit(fuse)(params)  # One program, not op by op.
  rcfg = traced["cfg"]
  assert rcfg.qkv_bias and rcfg.rotation.r2 != "none"
  assert not np.allclose(fused["decoder"]["layers"]["attn"]["v_proj"]["bias"],
                         params["decoder"]["layers"]["attn"]["v_proj"]["bias"])
  want = qtrain_logits(cfg, params, tokens())
  np.testing.assert_allclose(qtrain_logits(rcfg, fused, tokens()), want, rtol=0,
                             atol=1e-5 * np.abs(want).max())
  fresh = qwen2(tied=False, seed=7)
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                         params_to_hf_state_dict(fused, rcfg).items()}, strict=True)
  np.testing.assert_allclose(hf_logits(fresh, tokens()), hf_logits(model, tokens()), rtol=0,
                             atol=LOGIT_ATOL)

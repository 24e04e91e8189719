"""HF Llama -> qtrain conversion against transformers itself, the reference.

A tiny random ``LlamaForCausalLM`` (GQA, untied or tied, RoPE with and without
Llama-3 scaling) is converted and both frameworks' float32 logits compared.
"""

import json

import numpy as np
import pytest
import torch
import transformers

from qtrain.convert import (config_from_hf, load_hf_checkpoint, params_from_hf_model,
                            params_from_hf_state_dict, params_to_hf_state_dict)
from hf_util import hf_logits, numpy_state_dict, qtrain_logits, randomize
from qtrain.layers import RopeScaling

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

V, T, B = 256, 32, 2
# Scaling that bites at T=32: wavelengths above 16 positions are divided by 8,
# those between 4 and 16 interpolated, so most of H/2=8 frequencies change.
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
DEFAULT = {"rope_type": "default", "rope_theta": 500000.0}
# float32 on both sides; the frameworks differ only in accumulation order of
# matmuls and reductions over D=64/F=160 (and float64- vs float32-computed
# inverse frequencies), i.e. ~10 ulps of logits with |max| ~5, std ~1.25.
# Measured max |diff|: 5.6e-6..5.8e-6 without scaling, 6.2e-6..6.7e-6 with
# (tied/untied; scanned and unscanned identical): 1e-4 leaves ~15x margin.
LOGIT_ATOL = 1e-4


def hf_model(scaling: bool, tied: bool, seed: int = 0):
  config = transformers.LlamaConfig(
      vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=160, max_position_embeddings=64,
      rope_parameters=dict(LLAMA3 if scaling else DEFAULT), tie_word_embeddings=tied,
      rms_norm_eps=1e-5, attn_implementation="eager")
  torch.manual_seed(seed)
  return randomize(transformers.LlamaForCausalLM(config).float().eval())


def tokens(seed: int = 1):
  return np.random.default_rng(seed).integers(0, V, (B, T), dtype=np.int32)



@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscanned"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("scaling", [False, True], ids=["rope", "llama3_rope"])
def test_logits_match_transformers(scaling, tied, scan):
  model = hf_model(scaling, tied)
  cfg = config_from_hf(model.config, scan_layers=scan)
  assert (cfg.rope_scaling.factor == 8.0) == scaling and cfg.tie_embeddings == tied
  params = params_from_hf_model(model, cfg)
  assert ("lm_head" in params) != tied
  ref = hf_logits(model, tokens())
  got = qtrain_logits(cfg, params, tokens())
  np.testing.assert_allclose(got, ref, rtol=0, atol=LOGIT_ATOL)
  if scaling:  # The scaling must matter at this length, or the test proves nothing.
    unscaled = qtrain_logits(config_from_hf(model.config, scan_layers=scan,
                                            rope_scaling=RopeScaling()), params, tokens())
    assert np.abs(unscaled - ref).max() > 100 * LOGIT_ATOL


@pytest.mark.parametrize("shard", [False, True], ids=["single_file", "sharded"])
def test_load_safetensors_checkpoint(tmp_path, shard):
  model = hf_model(scaling=True, tied=False)
  model.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "1GB")
  assert (tmp_path / "model.safetensors.index.json").exists() == shard
  cfg, params = load_hf_checkpoint(tmp_path)
  assert cfg == config_from_hf(model.config)
  np.testing.assert_allclose(qtrain_logits(cfg, params, tokens()), hf_logits(model, tokens()),
                             rtol=0, atol=LOGIT_ATOL)


def test_load_bfloat16_checkpoint(tmp_path):
  """bf16 safetensors (as real Llama checkpoints ship) load without torch."""
  model = hf_model(scaling=False, tied=True).to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  _, params = load_hf_checkpoint(tmp_path)
  want = model.model.embed_tokens.weight.detach().float().numpy()
  assert params["embedding"].dtype == np.float32
  np.testing.assert_array_equal(params["embedding"], want)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscanned"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_round_trip(tied, scan):
  state_dict = numpy_state_dict(hf_model(scaling=False, tied=tied))
  cfg = config_from_hf(hf_model(False, tied).config, scan_layers=scan)
  exported = params_to_hf_state_dict(params_from_hf_state_dict(state_dict, cfg), cfg)
  assert sorted(exported) == sorted(state_dict)
  for k, v in state_dict.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_export_loads_into_transformers():
  model = hf_model(scaling=True, tied=False)
  cfg = config_from_hf(model.config)
  exported = params_to_hf_state_dict(params_from_hf_model(model), cfg)
  fresh = hf_model(scaling=True, tied=False, seed=7)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  np.testing.assert_array_equal(hf_logits(fresh, tokens()), hf_logits(model, tokens()))


def test_errors_name_the_key():
  model = hf_model(scaling=False, tied=False)
  cfg = config_from_hf(model.config)
  good = numpy_state_dict(model)
  missing = dict(good)
  del missing["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\]"):
    params_from_hf_state_dict(missing, cfg)
  extra = dict(good, **{"model.layers.2.mlp.up_proj.weight": good["lm_head.weight"]})
  with pytest.raises(ValueError, match=r"unexpected keys \['model.layers.2.mlp.up_proj"):
    params_from_hf_state_dict(extra, cfg)
  bad = dict(good, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)})
  with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight: expected "
                                       r"shape \(32, 64\) from the config, got \(64, 64\)"):
    params_from_hf_state_dict(bad, cfg)


def test_config_variants():
  base = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=160, max_position_embeddings=64)
  new = config_from_hf(dict(base, rope_parameters=LLAMA3))
  old_scaling = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
  old = config_from_hf(dict(base, rope_theta=500000.0, rope_scaling=old_scaling))
  assert new == old and new.rope_theta == 500000.0 and new.n_kv_heads == 4
  assert new.head_dim == 16 and new.rope_scaling.original_max_position == 16
  assert config_from_hf(json.loads(json.dumps(base)), dtype="bfloat16").dtype == "bfloat16"
  with pytest.raises(ValueError, match="rope_type='yarn'"):
    config_from_hf(dict(base, rope_parameters={"rope_type": "yarn", "factor": 4.0}))
  with pytest.raises(ValueError, match="rope_type='linear'"):
    config_from_hf(dict(base, rope_scaling={"type": "linear", "factor": 2.0}))
  for flag in ("attention_bias", "mlp_bias"):
    with pytest.raises(ValueError, match=flag):
      config_from_hf(dict(base, **{flag: True}))


# --- runtime dependencies -------------------------------------------------------

# Imported by qtrain only where the caller already holds the library's object
# (params_from_hf_model takes a torch model), so the caller installed it.
CALLER_SUPPLIED = {"torch"}


def _imported_modules(root):
  """Top-level third-party modules imported anywhere in ``root`` (lazily too)."""
  import ast, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  mods = set()
  for f in root.rglob("*.py"):
    for n in ast.walk(ast.parse(f.read_text())):
      if isinstance(n, ast.Import):
        mods |= {a.name.split(".")[0] for a in n.names}
      elif isinstance(n, ast.ImportFrom) and n.level == 0:
        mods.add(n.module.split(".")[0])
  return mods - set(sys.stdlib_module_names) - {"qtrain", "__future__"}


def _installed_by_make_train(root):
  """Distributions `make train` installs: install_requires plus the extras of
  its `.[data,quant]`, closed over their own (installed) requirements."""
  import configparser, importlib.metadata as md, re  # pylint: disable=g-import-not-at-top,multiple-imports
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
  makefile = (root / "Makefile").read_text()
  extras = re.search(r"-e '\.\[([a-z,]+)\]'", makefile).group(1).split(",")
  cfg = configparser.ConfigParser()
  cfg.read(root / "setup.cfg")
  lines = cfg["options"]["install_requires"].split("\n")
  for e in extras:
    lines += cfg["options.extras_require"][e].split("\n")
  todo = [Requirement(l).name for l in lines if l.strip() and not l.strip().startswith("#")]
  seen = set()
  while todo:
    name = norm(todo.pop())
    if name in seen:
      continue
    seen.add(name)
    try:
      reqs = md.requires(name) or []
    except md.PackageNotFoundError:
      continue
    todo += [Requirement(r).name for r in reqs if "extra ==" not in r]
  return seen, norm


def test_every_runtime_import_is_installed_by_make_train():
  """qtrain.convert imported safetensors although only the test extra named it:
  a `make train` install then failed at the first HF checkpoint load."""
  import importlib.metadata as md, pathlib  # pylint: disable=g-import-not-at-top,multiple-imports
  root = pathlib.Path(__file__).resolve().parents[1]
  installed, norm = _installed_by_make_train(root)
  dists = md.packages_distributions()
  missing = sorted(m for m in _imported_modules(root / "qtrain") - CALLER_SUPPLIED
                   if not any(norm(d) in installed for d in dists.get(m, [m])))
  assert not missing, f"imported by qtrain, not installed by `make train`: {missing}"

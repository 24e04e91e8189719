"""`python -m qtrain.convert import|export` end to end, transformers the reference.

A tiny random Qwen2ForCausalLM (non-zero q/k/v biases, tied embeddings, its
vocabulary as large as the test data's, so the data's tokenizer can drive it)
is saved with ``save_pretrained``, imported into a workdir by the CLI, and
the workdir is read by the tools that take a run: ``qtrain.generate`` (greedy
tokens equal to transformers' greedy tokens), ``train.init_from`` (the check
and the restore a fine-tune starts with) and ``qtrain.quantize``. Exporting
it gives an HF directory transformers loads with the same logits.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from conftest import DATA, ROOT, smoke_config
from test_hf_qwen2 import hf_logits, qwen2, tokens

V = 8192  # >= the test data's 8000 ids.
N_NEW = 8
PROMPT = "And God said"


def cli(*args, module="qtrain.convert"):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def model():
  return qwen2(tied=True, vocab=V)


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory):
  path = tmp_path_factory.mktemp("hf") / "qwen2_tiny"
  model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
  """(workdir, the import's stdout)."""
  path = tmp_path_factory.mktemp("runs") / "imported"
  r = cli("import", f"--hf={hf_dir}", f"--workdir={path}", f"--data_dir={DATA}")
  assert r.returncode == 0, r.stderr
  assert "imported qwen2 (" in r.stdout and "checkpoint step 0" in r.stdout
  assert json.loads((path / "hf_import.json").read_text())["model_type"] == "qwen2"
  return path, r.stdout


@pytest.fixture(scope="module")
def workdir(imported):
  return imported[0]


def torch_greedy(model, prompt, n_new, eos_id):
  """transformers' greedy decoding: argmax of the last position, appended."""
  ids, out, margins = list(prompt), [], []
  with torch.no_grad():
    for _ in range(n_new):
      logits = model(torch.tensor([ids])).logits[0, -1].numpy()
      top2 = np.sort(logits)[-2:]
      margins.append(top2[1] - top2[0])
      tok = int(logits.argmax())
      if tok == eos_id:
        break
      out.append(tok)
      ids.append(tok)
  return out, min(margins)


def test_generate_matches_transformers_greedy(model, workdir):
  from qtrain.data import loader, vocab  # pylint: disable=g-import-not-at-top
  from qtrain.inference import load_run  # pylint: disable=g-import-not-at-top
  from qtrain.train.sample import generate  # pylint: disable=g-import-not-at-top
  meta = loader.read_meta(str(DATA))
  sp = vocab.load_sentencepiece(os.path.join(DATA, meta["vocab_path"]))
  prompt = sp.encode(PROMPT)
  want, margin = torch_greedy(model, prompt, N_NEW, meta["eos_id"])
  # Greedy picks are stable only if no two logits are within the frameworks'
  # float32 difference (< 1e-5, tests/test_hf_qwen2.py): here the gap is >= 1e-3.
  assert margin > 1e-3
  _, run_model, params, step = load_run(str(workdir))
  assert step == 0 and run_model.cfg.qkv_bias
  assert generate(run_model, params, prompt, N_NEW, eos_id=meta["eos_id"]) == want
  # The CLI itself: its text is the decoded prompt + the same tokens (ids past
  # the tokenizer's pieces dropped, as it does).
  r = cli(f"--workdir={workdir}", f"--prompt={PROMPT}", f"--max_new_tokens={N_NEW}",
          module="qtrain.generate")
  assert r.returncode == 0, r.stderr
  known = [t for t in want if t < sp.get_piece_size()]
  assert r.stdout.strip() == sp.decode(prompt + known)


def test_export_loads_into_transformers(model, workdir, tmp_path):
  out = tmp_path / "exported"
  r = cli("export", f"--workdir={workdir}", f"--out={out}")
  assert r.returncode == 0, r.stderr
  assert "as qwen2" in r.stdout
  assert (out / "generation_config.json").exists()  # Carried from the HF directory.
  loaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation="eager").float().eval()
  assert type(loaded) is transformers.Qwen2ForCausalLM and loaded.config.tie_word_embeddings
  # The same float32 weights through the same torch code: bit-equal.
  np.testing.assert_array_equal(hf_logits(loaded, tokens() % V), hf_logits(model, tokens() % V))
  r = cli("export", f"--workdir={workdir}", f"--out={out}")
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
  assert "already holds a checkpoint" in r.stderr


def test_init_from_takes_it(model, imported):
  """What a fine-tune with --init_from=workdir does before training: the
  source check (model shape, vocabulary) and the params restore, on a config
  given the ``--config.model.*`` flags the import printed. (A real
  ``qtrain.finetune`` of 2 steps with them ran by hand: 35 s, too long here.)"""
  import flax  # pylint: disable=g-import-not-at-top
  from qtrain.convert.__main__ import _IMPORTED_FIELDS  # pylint: disable=g-import-not-at-top
  from qtrain.train import warm_start  # pylint: disable=g-import-not-at-top
  from qtrain.train.build import build_model  # pylint: disable=g-import-not-at-top
  from qtrain.train.checkpoint import load_config  # pylint: disable=g-import-not-at-top
  from qtrain.train.state import abstract_params  # pylint: disable=g-import-not-at-top
  workdir, stdout = imported
  cfg = smoke_config(init_from=str(workdir))
  flags = stdout.split("fine-tune it with: ")[1].split()
  for flag in [f for f in flags if f.startswith("--config.model.")]:
    key, value = flag[len("--config."):].split("=")
    *parents, leaf = key.split(".")
    node = cfg
    for k in parents:
      node = node[k]
    node[leaf] = type(node[leaf])(value == "True" if isinstance(node[leaf], bool) else value)
  source = load_config(str(workdir)).model
  assert all(cfg.model[f] == source[f] for f in _IMPORTED_FIELDS)
  warm_start.check_source(cfg)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          flax.linen.unbox(abstract_params(build_model(cfg), cfg.data.seq_len)))
  restored, step = warm_start._restore_source(cfg, abstract)  # pylint: disable=protected-access
  assert step == 0
  bias = restored["decoder"]["layers"]["attn"]["v_proj"]["bias"]
  np.testing.assert_array_equal(bias[1], model.model.layers[1].self_attn.v_proj.bias.detach())


def test_quantize_takes_it(workdir, tmp_path):
  from qtrain.quantize.__main__ import run  # pylint: disable=g-import-not-at-top
  run_dir = tmp_path / "run"
  shutil.copytree(workdir, run_dir)
  doc = json.loads((run_dir / "config.json").read_text())
  doc["data"]["eval_batches"] = 2  # Two held-out batches: enough to show it reads the run.
  (run_dir / "config.json").write_text(json.dumps(doc))
  m = run(str(run_dir), "w4a16", "rtn")
  assert m["step"] == 0 and np.isfinite(m["ppl_fp"]) and np.isfinite(m["ppl_ptq"])
  assert "decoder/layers/attn/q_proj" in m["quantized_matmuls"]


def _error(capsys, *argv) -> str:
  from qtrain.convert.__main__ import main  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as e:
    main(list(argv))
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err, err
  return err


def test_errors_are_one_line(hf_dir, workdir, tmp_path, capsys):
  err = _error(capsys, "import", f"--hf={tmp_path / 'missing'}", f"--workdir={tmp_path / 'w'}")
  assert "no config.json there" in err
  assert "already holds a run" in _error(capsys, "import", f"--hf={hf_dir}",
                                         f"--workdir={workdir}")
  doc = json.loads((hf_dir / "config.json").read_text())
  for name, change, says in [
      ("mistral", {"model_type": "mistral"}, "model_type='mistral'; qtrain converts 'llama' "
                                             "and 'qwen2' only"),
      ("wide_ffn", {"intermediate_size": 192}, "model.layers.0.mlp.gate_proj.weight: expected "
                                               "shape (192, 64) from the config, got (160, 64)"),
  ]:
    bad = tmp_path / name
    shutil.copytree(hf_dir, bad)
    (bad / "config.json").write_text(json.dumps(dict(doc, **change)))
    assert says in _error(capsys, "import", f"--hf={bad}", f"--workdir={tmp_path / name}_run")
    assert not (tmp_path / f"{name}_run").exists()  # Nothing half-written.
  assert "does not exist" in _error(capsys, "export", f"--workdir={tmp_path / 'nope'}",
                                    f"--out={tmp_path / 'o'}")


def test_training_in_the_imported_workdir_says_to_start_from_it(workdir):
  """The import holds params only (no optimizer state, no data position):
  the trainer refuses to resume it in one line naming the fix."""
  r = cli("--config=configs/default.py:smoke", f"--workdir={workdir}", module="qtrain.train")
  assert r.returncode == 2, r.stdout + r.stderr
  assert "holds imported params only" in r.stderr
  assert f"--config.train.init_from={workdir}" in r.stderr and "Traceback" not in r.stderr

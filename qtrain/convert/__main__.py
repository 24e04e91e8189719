"""Hugging Face checkpoints <-> qtrain workdirs.

  python -m qtrain.convert import --hf=DIR --workdir=runs/NAME [--data_dir=data/X] \\
      [--param_dtype=float32]
  python -m qtrain.convert export --workdir=runs/NAME --out=DIR [--step=N] \\
      [--dtype=float32|bfloat16] [--max_shard_mb=5120]
  python -m qtrain.convert export --ptq=runs/NAME/ptq_w4a16_rtn --out=DIR \\
      [--weights=auto|int|float] [--weights_only] [--dtype=...] [--max_shard_mb=5120]

``import`` reads an HF Llama or Qwen2 directory (``config.json`` +
``model.safetensors`` or shards; ``qtrain.convert.hf``) and writes a workdir
as a training run leaves one: ``config.json`` (the base config with the model
block filled from HF) and one orbax checkpoint at step 0 holding the params.
That is what ``--config.train.init_from`` / ``qtrain.finetune --init_from``,
``qtrain.quantize``, ``qtrain.eval`` and ``qtrain.generate`` read. Their data
must be tokenized with the HF model's vocabulary: ``--data_dir`` records the
prepared data (``config.data.dir``) that quantization calibrates on, generation
decodes with and fine-tuning checks the vocabulary against; without it the
field is empty and those tools say so. The HF tokenizer files are kept in
``<workdir>/hf_tokenizer/`` and ``export`` copies them back. It prints the
``--config.model.*`` overrides a fine-tuning config needs to match the model
(``init_from`` restores into the fine-tuning config's model).

``export`` restores the workdir's latest (or ``--step``) params and writes an
HF directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads:
Qwen2 when the model has q/k/v biases, else Llama. OSP pieces are merged and
online rotations removed first (``plain_params``); a QAT run exports its float
(latent) weights, since transformers has no qtrain quantizer to apply.

``export --ptq`` writes a PTQ export (``python -m qtrain.quantize --out``, or
a run holding one) instead: its quantized weights as transformers' own
packed-integer Linears (``--weights=int``) or dequantized to float
(``--weights=float``); ``auto`` takes int for each weight that fits it. A
weight-only recipe's model then gives qtrain's PTQ logits; a recipe that
quantizes activations or KV is refused unless ``--weights_only``
(``qtrain.convert.ptq_hf`` says what each form holds and why).

Errors a user can fix (a missing directory, an unsupported ``model_type``,
weights that do not match their config, an existing output) print one line
and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import sys

# Tokenizer and generation files of an HF directory: not weights, carried along.
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
               "generation_config.json", "chat_template.jinja")
TOKENIZER_DIR = "hf_tokenizer"
# Marks an imported workdir: its checkpoint holds params only, so the trainer
# cannot resume it (it is a source for init_from, not a run to continue).
IMPORT_RECORD = "hf_import.json"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m qtrain.convert",
                              description="Hugging Face checkpoints <-> qtrain workdirs.")
  sub = p.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="HF Llama / Qwen2 directory -> qtrain workdir")
  imp.add_argument("--hf", required=True, help="HF directory: config.json + *.safetensors.")
  imp.add_argument("--workdir", required=True, help="New workdir to write.")
  imp.add_argument("--data_dir", default="", help="Prepared data tokenized with the HF "
                   "model's vocabulary (config.data.dir).")
  imp.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16"),
                   help="config.model.param_dtype, and the dtype the checkpoint stores.")
  exp = sub.add_parser("export", help="qtrain workdir -> HF directory")
  source = exp.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="Run with config.json and checkpoints/.")
  source.add_argument("--ptq", help="PTQ export (python -m qtrain.quantize's --out), or a run "
                      "holding one.")
  exp.add_argument("--out", required=True, help="HF directory to write (new or empty).")
  exp.add_argument("--step", type=int, default=None, help="Checkpoint step; default the latest.")
  exp.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="Dtype of the safetensors; default the params'.")
  exp.add_argument("--max_shard_mb", type=float, default=5120.0,
                   help="Largest safetensors file; more weights go to further shards.")
  exp.add_argument("--weights", default="auto", choices=("auto", "int", "float"),
                   help="--ptq: quantized weights as transformers' packed-int Linears (int), "
                   "dequantized (float), or int for each weight that fits it (auto).")
  exp.add_argument("--weights_only", action="store_true",
                   help="--ptq of a recipe that quantizes activations or KV: export its weights "
                   "with float activations (a different model: its logits differ).")
  return p


def _model_block(model_cfg) -> dict:
  """config.model's fields from a ModelConfig (nested dataclasses as dicts)."""
  block = dataclasses.asdict(model_cfg)
  block["weight_forms"] = ()
  for key in ("r2_layers", "r3_layers", "r4_layers"):  # None means every block: "all".
    if block["rotation"][key] is None:
      block["rotation"][key] = "all"
  return block


# The model fields an HF import sets: together they fix the function, so a
# fine-tuning config must repeat them all (its own defaults may differ).
_IMPORTED_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                    "d_ff", "max_seq_len", "rope_theta", "rope_scaling", "tie_embeddings",
                    "norm_eps", "qkv_bias")


def model_flags(model_block: dict) -> list[str]:
  """``--config.model.*`` overrides that give any config this imported model:
  what a fine-tuning config needs, since ``init_from`` restores into the
  fine-tuning config's model."""
  flags = []
  for key in _IMPORTED_FIELDS:
    value = model_block[key]
    items = value.items() if isinstance(value, dict) else [(None, value)]
    flags += [f"--config.model.{key}{'' if k is None else '.' + k}={v}" for k, v in items]
  return flags


def import_hf(hf_dir: str, workdir: str, *, data_dir: str = "",
              param_dtype: str = "float32") -> dict:
  """Writes the workdir; returns what it wrote (model_type, params, paths)."""
  import jax  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from qtrain.config.base import base_config  # pylint: disable=g-import-not-at-top
  from qtrain.config.validate import validate  # pylint: disable=g-import-not-at-top
  from qtrain.convert.hf import load_hf_checkpoint  # pylint: disable=g-import-not-at-top
  from qtrain.data import loader  # pylint: disable=g-import-not-at-top
  from qtrain.layers.config import dtype_from_name  # pylint: disable=g-import-not-at-top
  from qtrain.train.build import build_model  # pylint: disable=g-import-not-at-top
  from qtrain.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from qtrain.train.loop import save_config  # pylint: disable=g-import-not-at-top
  from qtrain.train.state import abstract_params  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(hf_dir, "config.json")):
    raise FileNotFoundError(f"--hf={hf_dir}: no config.json there; give a Hugging Face "
                            "model directory (config.json + *.safetensors)")
  if os.path.exists(os.path.join(workdir, "config.json")) or os.path.exists(
      os.path.join(workdir, "checkpoints")):
    raise ValueError(f"--workdir={workdir} already holds a run; import into a new workdir")
  with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
    model_type = json.load(f).get("model_type", "llama")
  model_cfg, params = load_hf_checkpoint(hf_dir, dtype=np.dtype(dtype_from_name(param_dtype)),
                                         param_dtype=param_dtype)
  cfg = base_config()
  cfg.model.update(_model_block(model_cfg))
  cfg.data.dir = data_dir
  cfg.data.seq_len = min(cfg.data.seq_len, model_cfg.max_seq_len)
  validate(cfg)  # What a run from this workdir checks first (ConfigError naming the field).
  if data_dir:
    vocab = loader.read_meta(data_dir)["vocab_size"]
    if vocab > model_cfg.vocab_size:
      raise ValueError(f"--data_dir={data_dir} has {vocab} token ids, more than the model's "
                       f"vocab_size={model_cfg.vocab_size}: prepare it with the HF model's "
                       "tokenizer")
  # The model config.json describes must hold exactly these arrays: the tools
  # that read the workdir rebuild it from there.
  want = flax.traverse_util.flatten_dict(
      flax.linen.unbox(abstract_params(build_model(cfg), cfg.data.seq_len)))
  have = flax.traverse_util.flatten_dict(params)
  if set(want) != set(have):
    raise ValueError(f"the model of {hf_dir} does not rebuild from its config: params "
                     f"{sorted('/'.join(k) for k in set(want) ^ set(have))} differ")
  for k, v in want.items():
    if v.shape != have[k].shape:
      raise ValueError(f"{'/'.join(k)}: the config gives shape {v.shape}, the checkpoint "
                       f"{have[k].shape}")
  save_config(cfg, workdir)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
  try:  # The train state's params subtree is all the readers restore.
    ckpt.save(0, {"params": jax.tree.map(jax.numpy.asarray, params)}, {}, force=True)
  finally:
    ckpt.close()
  with open(os.path.join(workdir, IMPORT_RECORD), "w", encoding="utf-8") as f:
    json.dump({"hf": os.path.abspath(hf_dir), "model_type": model_type,
               "note": "checkpoint step 0 holds params only (no optimizer state): start "
                       f"runs from it with --config.train.init_from={workdir}"}, f, indent=2)
  side = [n for n in _SIDE_FILES if os.path.isfile(os.path.join(hf_dir, n))]
  if side:
    os.makedirs(os.path.join(workdir, TOKENIZER_DIR), exist_ok=True)
    for name in side:
      shutil.copy2(os.path.join(hf_dir, name), os.path.join(workdir, TOKENIZER_DIR, name))
  n_params = sum(int(np.prod(v.shape)) for v in have.values())
  return {"model_type": model_type, "params": n_params, "files": side,
          "flags": model_flags(cfg.model.to_dict())}


def export_hf(workdir: str, out: str, *, step: int | None = None, dtype: str | None = None,
              max_shard_mb: float = 5120.0) -> dict:
  """Writes the HF directory; returns what it wrote (model_type, step)."""
  from qtrain.convert.hf import hf_model_type, save_hf_checkpoint  # pylint: disable=g-import-not-at-top
  from qtrain.inference import load_run  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir={workdir} does not exist")
  _check_out(out)
  cfg, model, params, step = load_run(workdir, step=step)
  plain_cfg = save_hf_checkpoint(out, params, model.cfg, dtype=dtype,
                                 max_shard_bytes=int(max_shard_mb * 2**20))
  tokenizer = os.path.join(workdir, TOKENIZER_DIR)
  if os.path.isdir(tokenizer):
    for name in sorted(os.listdir(tokenizer)):
      shutil.copy2(os.path.join(tokenizer, name), os.path.join(out, name))
  del cfg
  return {"model_type": hf_model_type(plain_cfg), "step": step}


def export_ptq(ptq: str, out: str, *, step: int | None = None, weights: str = "auto",
               dtype: str | None = None, weights_only: bool = False,
               max_shard_mb: float = 5120.0) -> dict:
  """Writes the HF directory of a PTQ export (``qtrain.convert.ptq_hf``) and
  the source run's tokenizer files; returns what it wrote."""
  from qtrain.convert.ptq_hf import export_ptq_hf  # pylint: disable=g-import-not-at-top
  if step is not None:
    raise ValueError("--step picks a checkpoint of --workdir; a --ptq export holds one step "
                     "(quantize another with python -m qtrain.quantize --step=N)")
  _check_out(out)
  done = export_ptq_hf(ptq, out, weights=weights, dtype=dtype, weights_only=weights_only,
                       max_shard_bytes=int(max_shard_mb * 2**20))
  tokenizer = os.path.join(done["source"] or "", TOKENIZER_DIR)
  if done["source"] and os.path.isdir(tokenizer):
    for name in sorted(os.listdir(tokenizer)):
      shutil.copy2(os.path.join(tokenizer, name), os.path.join(out, name))
  return done


def _check_out(out: str) -> None:
  if os.path.exists(os.path.join(out, "config.json")) or glob.glob(
      os.path.join(out, "*.safetensors")):
    raise ValueError(f"--out={out} already holds a checkpoint; export into a new directory")


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO.
  from qtrain.train.errors import EXPECTED, one_line  # pylint: disable=g-import-not-at-top
  try:
    if args.command == "import":
      done = import_hf(args.hf, args.workdir, data_dir=args.data_dir,
                       param_dtype=args.param_dtype)
      print(f"imported {done['model_type']} ({done['params']:,} params) from {args.hf} into "
            f"{args.workdir} (checkpoint step 0"
            + (f"; tokenizer files in {TOKENIZER_DIR}/" if done["files"] else "") + ")")
      print(f"fine-tune it with: python -m qtrain.finetune --config=CONFIG "
            f"--init_from={args.workdir} --workdir=NEW {' '.join(done['flags'])}")
    elif args.ptq is not None:
      done = export_ptq(args.ptq, args.out, step=args.step, weights=args.weights,
                        dtype=args.dtype, weights_only=args.weights_only,
                        max_shard_mb=args.max_shard_mb)
      form = {"int": "transformers' packed-int Linears (quant_method 'gemma')",
              "int+float": "transformers' packed-int Linears (quant_method 'gemma') and "
                           f"{len(done['not_int'])} dequantized",
              "float": "dequantized float weights"}[done["form"]]
      print(f"exported {done['recipe']} {done['method']} of {done['ptq']} as {done['model_type']}"
            f" with {form} to {args.out}")
      for path, why in done["not_int"].items():
        print(f"note: float, not int: {path}: {why}")
      if done["weights_only"]:
        print("note: --weights_only: activations and KV are not quantized in this export; its "
              "logits differ from qtrain's PTQ model")
    else:
      if args.weights != "auto" or args.weights_only:
        raise ValueError("--weights and --weights_only apply to --ptq exports; a --workdir "
                         "export writes the run's float params")
      done = export_hf(args.workdir, args.out, step=args.step, dtype=args.dtype,
                       max_shard_mb=args.max_shard_mb)
      print(f"exported step {done['step']} of {args.workdir} as {done['model_type']} to "
            f"{args.out}")
  except (ValueError, *EXPECTED) as e:  # ValueError: a config or checkpoint that does not fit.
    print(f"error: {one_line(e)}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()

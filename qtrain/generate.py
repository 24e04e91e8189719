"""Text from a trained run or a PTQ export, decoded with the (quantized) KV cache.

  python -m qtrain.generate --workdir=runs/NAME --prompt="And God said" \
      --max_new_tokens=64 [--temperature=0.8] [--seed=0] [--kv_bits=4] [--step=N]
  python -m qtrain.generate --ptq=runs/NAME/ptq_w4a16_rtn [--dequantize] ...

Rebuilds the model from ``workdir/config.json`` (its ``config.quant``
included) and restores the params of the latest checkpoint (or ``--step``)
onto one device.
``--kv_bits=B`` (2..8) overrides the run's KV quantizer with int B asymmetric
per token per head (the w4a4kv4 preset's KV spec at B bits); ``--kv_bits=0``
keeps K/V unquantized. Without it the run's own config decides.

``--ptq=DIR`` runs a PTQ export (``python -m qtrain.quantize``) the way its
evaluation does (the recipe's activation and KV quantizers, AWQ input
scales), on the source run's vocabulary. Its symmetric 4-bit weights stay
packed two codes a byte on the device (``export.load_packed``: the
``int4_packed`` weight form, the W4A16 kernel for bf16 activations on GPU);
that is the default because it is the point of a 4-bit export, and on every
backend it gives the tokens of the dequantized model (the XLA path is
bit-identical to it; the kernel differs by float32 summation order).
``--dequantize`` loads float kernels instead (``load_quantized``), e.g. to
compare the two.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from qtrain.inference import load_ptq, load_run

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with config.json and checkpoints.")
_PTQ = flags.DEFINE_string("ptq", None, "PTQ export directory (instead of --workdir).")
_DEQUANTIZE = flags.DEFINE_bool("dequantize", False, "--ptq: float kernels instead of packed "
                                "int4 codes resident.")
_PROMPT = flags.DEFINE_string("prompt", "And God said", "Text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling temperature.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_KV_BITS = flags.DEFINE_integer("kv_bits", None, "Override the KV cache quantizer: int bits "
                                "2..8 (asymmetric, per token per head) or 0 for none.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
flags.register_multi_flags_validator(
    ["workdir", "ptq"], lambda f: (f["workdir"] is None) != (f["ptq"] is None),
    "give exactly one of --workdir (a training run) and --ptq (a PTQ export)")

def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO.
  from qtrain.train.errors import EXPECTED  # pylint: disable=g-import-not-at-top
  if not _PROMPT.value:
    _fail('--prompt is empty: give text to continue, e.g. --prompt="And God said"')
  try:
    _generate()
  except EXPECTED as e:
    _fail(str(e))


def _fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def _generate() -> None:
  from qtrain.data import loader, vocab  # pylint: disable=g-import-not-at-top
  from qtrain.layers import kv_cache  # pylint: disable=g-import-not-at-top
  from qtrain.train.sample import generate  # pylint: disable=g-import-not-at-top
  try:
    if _PTQ.value:
      cfg, model, params, step = load_ptq(_PTQ.value, packed=not _DEQUANTIZE.value,
                                          kv_bits=_KV_BITS.value)
    else:
      cfg, model, params, step = load_run(_WORKDIR.value, _KV_BITS.value, _STEP.value)
  except ValueError as e:  # --kv_bits out of range, a config.json of another schema.
    _fail(str(e))
  per_token = kv_cache.cache_bytes_per_token(kv_cache.init_cache(model, 1, 1), 1, 1)
  print(f"checkpoint step {step}; KV cache {per_token:.0f} bytes per token", file=sys.stderr)
  meta = loader.read_meta(cfg.data.dir)
  sp = vocab.load_sentencepiece(os.path.join(cfg.data.dir, meta["vocab_path"]))
  prompt = sp.encode(_PROMPT.value)
  if not prompt:
    _fail(f"--prompt={_PROMPT.value!r} encodes to no tokens; give some text to continue")
  new = generate(model, params, prompt, _MAX_NEW.value, eos_id=meta.get("eos_id"),
                 temperature=_TEMPERATURE.value, seed=_SEED.value)
  known = [t for t in new if t < sp.get_piece_size()]
  if len(known) < len(new):  # The model's vocabulary is padded beyond the tokenizer's.
    print(f"warning: dropped {len(new) - len(known)} generated ids >= the tokenizer's "
          f"{sp.get_piece_size()} pieces (an undertrained model)", file=sys.stderr)
  print(sp.decode(prompt + known))


if __name__ == "__main__":
  app.run(main)

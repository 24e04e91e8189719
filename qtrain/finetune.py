"""Fine-tune a pretrained run, e.g. on the SFT task (`qtrain/data/sft.py`).

  python -m qtrain.finetune --config=configs/llama_125m.py:sft \\
      --init_from=runs/125m_corpus --workdir=runs/125m_sft [--config.x=y ...]

The same as ``python -m qtrain.train ... --config.train.init_from=runs/BASE``:
the source run's latest params start the run (fresh optimizer, step 0; the
source's model is rebuilt from its config.json), checked before anything
compiles against the config (same model shape, data tokenized with the same
vocabulary: ``qtrain/train/warm_start.py:check_source``). A workdir with
checkpoints of its own resumes from them. On data with a loss mask (prompt 0,
response 1) training and evaluation score the responses only, and the result
is reported as held-out response perplexity and loss.

Quantized fine-tuning (configs/roste/): with ``config.quant.rotation.choose =
"roste"`` RoSTE's lower level runs first, on the pretrained params, and its
choice fills ``config.quant.rotation.table`` (``qtrain/quant/roste.py``; saved
as ``<workdir>/roste_rotations.json`` and reused on resume). When the config
quantizes (``config.quant.mode`` not none), the run ends with the held-out
loss and perplexity of its final params under its quantizers
(``quantized_eval.json``): for ``config.quant.stage = "ptq"`` that is the
high-precision fine-tune with RTN weights, its only quantized number.
"""

from __future__ import annotations

from absl import app, flags

from qtrain.train import __main__ as train_cli  # --config, --workdir, multi-process flags.

_INIT_FROM = flags.DEFINE_string("init_from", None,
                                 "Workdir of the pretrained run whose params start this one.")
flags.mark_flag_as_required("init_from")


def main(argv):
  del argv
  cfg = train_cli.CONFIG.value
  if cfg.train.init_from and cfg.train.init_from != _INIT_FROM.value:
    train_cli.fail(f"--init_from={_INIT_FROM.value} and config.train.init_from="
                   f"{cfg.train.init_from} disagree; give one")
  cfg.train.init_from = _INIT_FROM.value
  workdir = train_cli.WORKDIR.value
  rot = cfg.quant.get("rotation")

  def choose_rotations(c):  # After jax.distributed starts: it touches devices.
    from qtrain.quant import roste  # pylint: disable=g-import-not-at-top
    c.quant.rotation.table = roste.choose_rotations(c, workdir)

  roste_choice = rot is not None and rot.sites and rot.choose == "roste"
  train_cli.train(cfg, workdir, choose_rotations if roste_choice else None)
  if cfg.quant.mode != "none":
    from qtrain.quant import roste  # pylint: disable=g-import-not-at-top
    print(roste.format_eval(roste.quantized_eval(workdir)), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=train_cli.parse_flags)

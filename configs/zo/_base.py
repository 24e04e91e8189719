"""Zeroth-order fine-tuning (MeZO, Malladi et al. 2023; ZO-Bench, Zhang et al.
2024; ZeroQAT): the base of the files in this folder, which differ in the
estimator and the update rule only (qtrain/train/zeroth_order.py).

  python -m qtrain.data.prepare --task=sft_en --out=data/sft_kjv --vocab_from=data/kjv
  python -m qtrain.train --config=configs/default.py --workdir=runs/default   # the base
  python -m qtrain.finetune --config=configs/zo/mezo.py --init_from=runs/default \\
      --workdir=runs/zo/mezo
  python -m qtrain.finetune --config=configs/zo/mezo.py:125m \\
      --init_from=runs/125m_corpus --workdir=runs/zo_125m/mezo
  python -m qtrain.train --config=configs/zo/mezo.py:smoke --workdir=/tmp/zo   # tests

Sizes (the variant): none = the ``make train`` model (configs/default.py) on
``data/sft_kjv``; ``125m`` = configs/llama_125m.py:sft (data/sft_en);
``smoke`` = configs/default.py:smoke (data/kjv, seconds). Other variants
(quant presets) pass through.

Budget: ZO steps are cheap but noisy. ``steps`` is set so every method gets
the same number of forward passes (``FORWARDS``): first-order AdamW counts 3
per step (a forward and a backward of ~2 forwards), SPSA 2 per query, forward
gradient 3 (a jvp ~ 1.5-3 forwards; 3 is the conservative count). Learning
rates are MeZO's (1e-6..1e-7 for SGD on 1e8+ params, scaled up for the small
models here) and ZO-Bench's; no clipping (an estimate g z has norm ~ |g|
sqrt(params)).
"""

from qtrain.config.variants import config_module, split_variants

SIZES = ("125m", "smoke")
# Forward passes per run, by size. The CPU size's 600 (200 AdamW steps, 300 MeZO
# steps) is what a shared 2-core CPU runs for all of configs/zo in ~40 minutes
# (~0.35 s per forward of 16 x 128 tokens, measured); 9000 would take ~50 min per method.
FORWARDS = {"": 600, "125m": 6000, "smoke": 24}
ZO_125M_BATCH = 16
CPU_EVAL_BATCHES = 16  # Of ~85 held-out batches, spread over all of them; ~5 s an eval on CPU.


def forwards_per_step(c) -> int:
  if c.train.step != "zeroth_order":
    return 3
  return (3 if c.zo.estimator == "forward" else 2) * c.zo.queries + (3 if c.zo.conservative else 0)


def get_config(arg: str = "", *, rule: str, lr: float, estimator: str = "spsa",
               cpu_lr: float | None = None, **zo):
  """The point: ``rule`` is the optimizer (sgd | adamw; ``first_order`` = AdamW
  with backprop), ``estimator`` and ``config.zo`` fields; ``cpu_lr`` replaces
  ``lr`` on the CPU size (the ``make train`` model), where it was checked. A
  ZO-SGD step's stable lr falls with the number of perturbed params (the
  estimate's norm grows as sqrt(params)), so a CPU value does not carry to 125m."""
  variants = split_variants(arg)
  rest = ",".join(v for v in variants if v not in SIZES)
  size = next((v for v in variants if v in SIZES), "")
  if size == "125m":
    c = config_module("llama_125m").get_config(",".join(filter(None, ("sft", rest))))
    # MeZO's and ZO-Bench's batch of 16 sequences: at SFT's 64 a forward of
    # 125M costs ~4x more, and 6000 forwards per method would not fit one
    # session's device time for six methods (every method alike).
    c.data.global_batch_size = ZO_125M_BATCH
  else:
    c = config_module("default").get_config(",".join(filter(None, (size, rest))))
    if not size:
      c.data.update(dir="data/sft_kjv", eval_batches=CPU_EVAL_BATCHES)
  if rule == "first_order":
    c.optim.update(name="adamw")
  else:
    c.train.step = "zeroth_order"
    c.optim.update(name=rule, grad_clip=0.0, warmup_steps=0)
    c.zo.update(estimator=estimator, **zo)
  c.optim.update(lr=cpu_lr if cpu_lr is not None and not size else lr, decay_steps=0)
  steps = max(FORWARDS[size] // forwards_per_step(c), 1)
  c.train.update(steps=steps, eval_every=max(steps // 4, 1), checkpoint_every=max(steps // 4, 1),
                 log_every=max(min(steps // 50, 50), 1))
  if size == "smoke":
    c.train.update(sample_tokens=0, eval_every=steps, checkpoint_every=max(steps // 2, 1))
  c.optim.warmup_steps = min(c.optim.warmup_steps, steps // 10)
  return c

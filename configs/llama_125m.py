"""A 125M-class Llama: 12 layers x d 768 (ffn 2048, 12 heads), vocab 32000.

  python -m qtrain.train --config=configs/llama_125m.py --workdir=runs/125m
  python -m qtrain.train --config=configs/llama_125m.py:corpus --workdir=runs/125m_corpus
  python -m qtrain.train --config=configs/llama_125m.py:smoke --workdir=/tmp/smoke

``corpus``: the reproduction base on ``data/debian_en`` (``make corpus``),
64 x 1024 tokens a step, 1600 steps = 105M tokens; the budget arithmetic is in
docs/reproductions.md; ``corpus,short`` is the same at 300 steps (19.7M
tokens), what a sweep of several runs affords on one H100 in one session
(``configs/optim/*.py:125m,short``). ``sft``: fine-tuning on ``data/sft_en`` (prompt ->
response, responses scored) from a ``corpus`` run::

  python -m qtrain.finetune --config=configs/llama_125m.py:sft \
      --init_from=runs/125m_corpus --workdir=runs/125m_sft
"""

from qtrain.config import base_config
from qtrain.config.variants import apply_variants, split_variants

SIZES = ("smoke", "corpus", "short", "sft")
SHORT_STEPS = 300  # 19.7M tokens: a sweep of several such runs fits one session's device time.


def corpus(c, steps: int = 1600) -> None:
  """Sets ``c`` to train on data/debian_en for ``steps`` steps of 65,536 tokens."""
  c.data.update(dir="data/debian_en", seq_len=1024, global_batch_size=64,
                eval_batch_size=32, eval_batches=16)
  # Dictionary entries are short: a 1024-token row packs up to ~20 of them (46 of
  # the SFT pairs); the packed cuDNN path needs the bound (data/global_batch.py).
  c.model.attention_max_segments = 64
  c.optim.update(lr=1.5e-3, warmup_steps=min(200, steps // 10), decay_steps=0,
                 min_lr_ratio=0.1, weight_decay=0.1)
  c.train.update(steps=steps, log_every=50, eval_every=max(steps // 8, 1),
                 checkpoint_every=max(steps // 4, 1), sample_prompt="The kernel")


def sft(c, steps: int = 200) -> None:
  """Sets ``c`` (a ``corpus`` config) to fine-tune on data/sft_en for ``steps`` steps."""
  c.data.update(dir="data/sft_en", eval_batches=0)  # The whole held-out split.
  c.optim.update(lr=3e-4, warmup_steps=max(steps // 10, 1), decay_steps=0)
  c.train.update(steps=steps, log_every=10, eval_every=max(steps // 4, 1),
                 checkpoint_every=max(steps // 2, 1), sample_prompt="Define: kernel\n")


def get_config(arg: str = ""):
  c = base_config()
  # scan_unroll=0: the blocks unrolled (params still [L, ...]): the loop copied every
  # saved activation into an [L, ...] stack (llama_1b, H100: +7.3% tok/s, +4.9 GiB).
  # fused_qkv/fused_mlp: q/k/v and gate/up one GEMM each, same params (llama_1b,
  # H100: +1.7% tok/s); they fall back to separate matmuls under quantizers.
  c.model.update(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                 head_dim=64, d_ff=2048, max_seq_len=2048, param_dtype="float32",
                 dtype="bfloat16", remat_policy="dots_no_batch_attn", scan_unroll=0,
                 fused_qkv=True, fused_mlp=True)
  c.data.update(seq_len=2048, global_batch_size=16, eval_batch_size=16)
  c.optim.update(lr=6e-4, warmup_steps=2000, weight_decay=0.1)
  c.train.update(steps=100_000, log_every=50, eval_every=2000, checkpoint_every=2000)
  variants = split_variants(arg)
  if "short" in variants and "corpus" not in variants:
    raise ValueError("configs/llama_125m.py: the variant 'short' shortens 'corpus'; "
                     "use 'corpus,short'")
  if "corpus" in variants or "sft" in variants:
    corpus(c, steps=SHORT_STEPS if "short" in variants else 1600)
  if "sft" in variants:
    sft(c)
  if "smoke" in variants:  # Same architecture family, laptop size.
    c.model.update(vocab_size=8192, d_model=96, n_layers=2, n_heads=6, n_kv_heads=6,
                   head_dim=16, d_ff=256, dtype="float32")
    c.data.update(dir="data/kjv", seq_len=64, global_batch_size=8, eval_batch_size=8,
                  eval_batches=1)
    c.optim.update(warmup_steps=2)
    c.train.update(steps=4, log_every=1, eval_every=4, checkpoint_every=4, sample_tokens=4)
  apply_variants(c, [v for v in variants if v not in SIZES], "configs/llama_125m.py")
  return c

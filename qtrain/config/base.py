"""Every config field, its default and what it means: the one source of truth.

Config files in ``configs/`` start from ``base_config()`` and change fields;
``qtrain.config.validate`` rejects any key that is not defined here.
"""

from __future__ import annotations

import ml_collections

from qtrain.quant.config import quant_config_defaults


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Params init and data order.

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=8192,  # >= the data vocabulary; pad to a multiple of 128.
      d_model=256,
      n_layers=4,
      n_heads=4,
      n_kv_heads=2,  # Must divide n_heads (grouped-query attention).
      head_dim=64,  # Even (RoPE rotates pairs).
      d_ff=704,
      max_seq_len=2048,  # Longest sequence RoPE positions are trained for.
      rope_theta=10000.0,
      rope_scaling=dict(  # Llama-3 RoPE frequency scaling; factor 1 = off.
          factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position=8192),
      tie_embeddings=False,
      norm_eps=1e-5,
      qkv_bias=False,  # Biases on q/k/v (Qwen2; qtrain/convert/hf.py imports them).
      param_dtype="float32",  # float32 | bfloat16
      dtype="float32",  # Compute dtype: float32 | bfloat16 | float16
      scan_layers=True,
      scan_unroll=1,
      remat_policy="none",  # none | full | dots | dots_no_batch | dots_no_batch_attn | qkv_attn | dots_attn
      # True: the dots policies also keep each int8/fp8 matmul's operand codes
      # and scales (1 byte per element) instead of quantizing X and W again in
      # the backward (qtrain/quant/dot_general.py: QUANT_CODES). Off: on an
      # H100 it was no faster for llama_1b fp8 (unrolled stack: XLA already
      # reuses the forward's codes; scanned: 228.4 vs 226.7 ms, +4.9 GiB).
      save_quant_codes=False,
      # q/k/v and gate/up each as one wider matmul where no quantizer,
      # telemetry, rotation or non-dense form sees them apart (same params).
      fused_qkv=False,
      fused_mlp=False,
      attention_impl="auto",  # auto (cuDNN on GPU for bf16/fp16) | xla | cudnn
      # Packed documents per row the cuDNN path describes (0 = seq_len, which
      # is exact but slow); the loop stops with a clear error if a batch has more.
      attention_max_segments=16,
      # mesh.sequence > 1: none (XLA gathers K/V), ring or all_gather
      # (qtrain/parallel/context_parallel.py; zig-zag order at data/global_batch.py).
      context_parallel="none",
      init_std=0.02,
      # Weight forms by path, first match wins (qtrain/layers/weights.py), e.g.
      # (dict(pattern=r"decoder/layers/mlp/.*", form="low_rank", rank=64),); none: dense.
      weight_forms=(),
      # Outlier-safe pretraining (OSP, Park et al. 2025; docs/reproductions.md):
      norm="rmsnorm",  # rmsnorm (per-channel gain) | ssnorm (Single-Scale: one learnable scalar)
      # EmbProj: orthogonally initialised d x d projections after the embedding
      # and before the LM head; export merges them into a plain Llama.
      embproj=False,
      # Online fast Walsh-Hadamard transform of the down_proj input
      # (d_ff a power of two); fold_ffn_hadamard turns it on in a trained model.
      ffn_hadamard=False,
      # Rotations (qtrain/layers/rotation.py; SpinQuant's places). R1 (residual
      # stream) and R2 (per head on V/O) are fused into the weights by
      # qtrain.convert.rotate.fuse_rotations and only recorded here; R3 (Q, K
      # after RoPE) and R4 (down_proj input) run online. Kinds: none | hadamard |
      # random_hadamard (| learned: r1, r2). *_layers: "all" or blocks "0-3,7".
      # impl: fwht | matmul | matmul_bf16 (how R3/R4 run; matmul_bf16 rounds the
      # two-gemm intermediate to bf16: 0.60 ulp rms against 0.43, 10% of the llama_1b
      # step on an H100 against 24% for matmul, docs/benchmarks.md).
      # save: the remat policy also keeps R3/R4's outputs, so the backward
      # does not run them again (qtrain/layers/rotation.py: remat_policy).
      # fold_grad: R4's backward through down_proj's weight, where the
      # quantizers pass the activations' gradient on (rotation.Online).
      rotation=dict(r1="none", r2="none", r2_layers="all", r3="none", r3_layers="all",
                    r4="none", r4_layers="all", seed=0, impl="matmul_bf16", save=False,
                    fold_grad=True),
      # LM head + cross-entropy over this many chunks of each row's tokens
      # (strided: chunk j holds positions j, j+n, ...), each recomputed in the
      # backward, so the step never holds [B, T, V] float32 logits
      # (qtrain/train/loss.py). Must divide data.seq_len; 0 = off.
      loss_chunks=0,
  ))

  # Device mesh, outermost axis first; sizes multiply to the device count and
  # one may be -1 (the rest). Inner axes get the faster links: tensor talks
  # inside every layer, data once per step (qtrain/parallel/mesh.py,
  # docs/parallelism.md). The batch is split over data x fsdp.
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,  # Replicas, one gradient all-reduce per step.
      fsdp=1,  # ZeRO-3: params, grads and optimizer state split; layers gathered one at a time.
      pipeline=1,  # Pipeline stages (not built yet: must be 1).
      sequence=1,  # Activations split along the sequence (context parallelism).
      tensor=1,  # Megatron tensor parallelism + sequence-parallel norms; vocab-parallel loss.
  ))

  c.data = ml_collections.ConfigDict(dict(
      dir="data/kjv",  # Made by `python -m qtrain.data.prepare`.
      seq_len=128,
      global_batch_size=16,  # Rows per step over all devices.
      eval_batch_size=16,
      # Held-out batches per evaluation: 0 = the whole split (every target
      # once, comparable with meta.json's unigram baseline); N > 0 = at most N
      # batches of rows spread evenly from the split's first document to its
      # last (qtrain/data/held_out.py).
      eval_batches=0,
      # The train and held-out streams are cut into this many fixed shards
      # (every shards-th document each); a process owns shards / processes of
      # them, so the global batches are the same on any process count dividing
      # it and a checkpoint resumes on one (qtrain/data/loader.py). 0 = one
      # per process loading distinct rows; must divide global_batch_size and
      # eval_batch_size.
      shards=0,
  ))

  c.optim = ml_collections.ConfigDict(dict(
      # Optimizer of every group that names none; a name in the registry of
      # qtrain/optim (adamw, frozen), each with its group below.
      name="adamw",
      lr=3e-3,  # Peak learning rate.
      warmup_steps=30,
      # Applied updates over which the cosine decays to lr * min_lr_ratio (then
      # stays there); 0 = train.steps. Fixed for a run's life: to train past it
      # on resume, set it to the old train.steps.
      decay_steps=0,
      min_lr_ratio=0.1,
      weight_decay=0.1,  # Decoupled (AdamW), times the group's wd_mult.
      # Params whose path ("decoder/layers/attn_norm/scale") matches one of
      # these regexes get no weight decay.
      no_decay=(r".*norm.*", r"^embedding$", r".*_(step|offset)$", r".*/bias$"),  # + LSQ steps, biases.
      grad_clip=1.0,  # Global-norm clip over all params; 0 disables.
      z_loss=0.0,  # Weight of the log(Z)^2 auxiliary loss (PaLM).
      # Ordered rules; the first whose pattern fullmatches a param path picks
      # its group: dict(pattern, optimizer=name, lr_mult=1.0, wd_mult=1.0).
      # Every param must match one (qtrain/optim/groups.py).
      groups=(dict(pattern=r".*"),),
      adamw=dict(
          b1=0.9,
          b2=0.95,
          eps=1e-8,
          mu_dtype="float32",  # First-moment dtype (bfloat16 halves its memory traffic).
      ),
      muon=dict(  # optax.contrib.muon for matrices (qtrain/optim/muon.py).
          beta=0.95,  # Momentum.
          nesterov=True,
          ns_steps=5,  # Newton-Schulz iterations.
          eps=1e-8,
          # Update RMS matched to AdamW's: 0.2 * sqrt(max(fan_in, fan_out)) scaling.
          rms_scale=0.2,
          mu_dtype="float32",
          # Orthogonalise stacks of same-shape matrices split over the mesh
          # axes below, whole matrices per device (OSP's scheme; no GSPMD
          # all-reduce inside Newton-Schulz); False: optax.contrib.muon per leaf.
          stacked=True,
          stack_axes=("data", "fsdp", "sequence", "tensor"),  # Those of size > 1 are used.
          ns_dtype="float32",  # Newton-Schulz dtype (stacked only); OSP iterates in bfloat16.
      ),
      # Memory-efficient optimizers (qtrain/optim/galore.py, fira.py, apollo.py;
      # configs/optim/). Matrices only: other params of their group get Adam.
      galore=dict(  # optax.contrib.galore per matrix (scanned layers: one SVD each).
          rank=128,  # Subspace rank r (min(r, m, n) per matrix).
          update_proj_gap=200,  # Updates between SVD refreshes of the projector.
          scale=0.25,  # Multiplies the projected-back update (GaLore's alpha).
          b1=0.9, b2=0.95, eps=1e-8,  # The Adam run inside the subspace.
      ),
      fira=dict(  # GaLore + the residual outside the subspace, norm-scaled (Fira).
          rank=128, update_proj_gap=200,
          scale=1.0,  # Multiplies the whole update (Fira's reference setup: 1).
          gamma=1.01,  # Norm-growth limiter: ||S_t|| <= gamma ||S_t-1||; 0 = off.
          b1=0.9, b2=0.95, eps=1e-8,
      ),
      apollo=dict(  # AdamW's channel/tensor-wise scaling from random projections.
          mode="apollo",  # apollo (channel-wise, rank r) | mini (tensor-wise, rank 1)
          rank=256, update_proj_gap=200,  # P redrawn from `seed` every gap updates.
          scale=1.0,  # alpha on the update; APOLLO-Mini uses sqrt(128) = 11.31.
          gamma=1.01,  # Fira's norm-growth limiter; 0 = off.
          b1=0.9, b2=0.95, eps=1e-8, seed=0,
      ),
      # Restarts (Glentis et al. 2025; qtrain/optim/wrappers.py), around every
      # group's transform: zero the moments (fields named in `moments`) every
      # `every` updates (match galore.update_proj_gap to reset at each refresh).
      restarts=dict(every=0, moments=("mu", "nu")),  # 0 = off.
      # Re-split each low-rank pair A B = U S V^T as U sqrt(S), sqrt(S) V^T every
      # `every` updates (the function unchanged); 0 = off.
      refactor=dict(every=0),
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=300,
      log_every=10,
      eval_every=100,
      checkpoint_every=100,
      keep_checkpoints=3,
      async_checkpoint=True,
      nan_policy="skip",  # skip (drop the update, go on) | stop (raise)
      sample_tokens=48,  # Length of the text sample at the end; 0 = none.
      sample_prompt="And God said",
      peak_tflops=0.0,  # Per-device peak for MFU; 0 = from the device kind.
      # A workdir whose latest checkpoint's params start this run (fresh
      # optimizer, step 0): fine-tuning, e.g. QAT from a trained model. A run
      # that has checkpoints of its own resumes from them instead.
      init_from="",
      # Step family (registry in qtrain/train/families.py): first_order.
      step="first_order",
      # Microbatches per optimizer step (first_order only): the global batch is
      # split into this many, gradients summed in float32 over a scan, one
      # update; same loss and gradient as the whole batch at once
      # (qtrain/train/first_order.py). global_batch_size must divide by it
      # times data x fsdp.
      grad_accum_steps=1,
      # Pipeline parallelism, with config.mesh.pipeline > 1 and step="pipeline"
      # (qtrain/train/pipeline.py): schedule gpipe | circular (interleaved,
      # pipeline_repeats virtual stages per device) | 1f1b (PipeDream-flush) |
      # interleaved_1f1b (Megatron's interleaved 1F1B: pipeline_repeats stages
      # per device, one forward and one backward slot per tick); microbatches
      # per step, 0 = config.mesh.pipeline.
      pipeline_schedule="gpipe",
      pipeline_microbatches=0,
      pipeline_repeats=2,  # circular, interleaved_1f1b: each microbatch visits every device this often.
      # Flax collections the train step applies as mutable and returns as
      # metrics, e.g. ("intermediates",) for values sown with self.sow.
      collect=(),
  ))
  # In-training activation telemetry (qtrain/analysis): excess kurtosis and
  # max |x| per layer of the residual stream and every quantized matmul's input.
  # Measured steps run a second jitted step with the statistics sown (same
  # update); the others compute none (qtrain/analysis/telemetry.py).
  c.telemetry = ml_collections.ConfigDict(dict(
      every=0,  # Steps between measured steps (inside the jitted step); 0 = off.
      # Named sites measured (qtrain/layers/hooks.py): the residual stream, as
      # OSP aggregates it; add "mlp_hidden" for the down_proj input before rotations.
      sites=("embed_out", "block_out"),
      # Matmuls whose input is measured, a regex fullmatching the canonical
      # path ("decoder/layers/mlp/down_proj", "lm_head"); "" = none.
      matmuls=".*",
  ))
  # Compressed data-parallel gradient exchange (qtrain/parallel/exchange.py),
  # run by --config.train.step=compressed over the `data` axis (per fsdp shard on a
  # data x fsdp mesh); configs/exchange/.
  c.exchange = ml_collections.ConfigDict(dict(
      method="dense",  # dense (pmean, the reference) | dgc | powersgd
      min_size=4096,  # Matrices (per scanned layer) with fewer elements go dense.
      dgc=dict(  # Deep Gradient Compression (Lin et al. 2018), top-k per matrix
          # (per fsdp shard of it when fsdp > 1).
          sparsity=0.999,  # Share of each matrix not sent per step, after warm-up.
          warmup_steps=0,  # Steps over which the stages below run; 0 = none.
          warmup_sparsity=(0.75, 0.9375, 0.984375, 0.996),  # One compiled branch each.
          # Momentum correction + factor masking: the exchange carries the
          # velocity, so pair m > 0 with a momentum-free optimizer (Adam's
          # first moment is a momentum already: keep 0 with AdamW).
          momentum=0.0,
          clip=0.0,  # Local global-norm clip at clip / sqrt(data) before accumulating; 0 = off.
      ),
      powersgd=dict(  # PowerSGD (Vogels et al. 2019): one warm-started power iteration.
          rank=4,  # r per matrix (min(r, n, m)).
          seed=0,  # Q's initial draw.
      ),
  ))
  # Zeroth-order fine-tuning (MeZO, ZO-Bench; qtrain/train/zeroth_order.py,
  # configs/zo/), with config.train.step="zeroth_order". The update rule is the
  # optimizer of config.optim (sgd: MeZO / ZO-SGD-MMT / ZO-SGD-Sign; adamw:
  # ZO-Adam) fed with the estimate g_hat * z; which params move (and are
  # perturbed) is config.optim.groups: a group with optimizer="frozen" is neither.
  c.optim.sgd = ml_collections.ConfigDict(dict(  # qtrain/optim/zo_sgd.py
      momentum=0.0,  # Velocity decay; 0 = plain SGD (MeZO).
      nesterov=False,
      sign=False,  # Step lr * sign(update) per element (ZO-SGD-Sign).
  ))
  c.zo = ml_collections.ConfigDict(dict(
      # spsa: g_hat = (L(p + eps z) - L(p - eps z)) / (2 eps), two forwards (MeZO);
      # forward: g_hat = dL/dp . z from one jax.jvp (forward gradient; no quantizer
      # estimators, which are custom VJPs).
      estimator="spsa",
      eps=1e-3,  # Perturbation scale (spsa); MeZO uses 1e-3.
      queries=1,  # Directions z per step, their estimates averaged.
      # ZO-SGD-Cons: two more forwards at p -/+ update and one at p; keep the lowest.
      conservative=False,
      # Perturb one block per step, round robin: each decoder layer, then the
      # rest (embedding, final norm, head) as the last block (ZO-Bench block-wise).
      blockwise=False,
      # Generator of z: rbg (XLA's RngBitGenerator, one op that fuses into the
      # perturbation; z depends on backend and mesh) | threefry (the same z on
      # any mesh; its expansion holds u32 temporaries of 2-4x each leaf on CPU).
      rng="rbg",
  ))
  # Quantization: mode + ordered rules over matmul paths; presets in
  # configs/quant/ (select with a config variant, e.g. `default.py:w4a4`).
  c.quant = quant_config_defaults()
  return c

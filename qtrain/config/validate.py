"""Config validation before anything is compiled.

Each error names the field (``config.model.n_kv_heads``) and says how to fix it.
"""

from __future__ import annotations

import difflib
import math

import jax
import ml_collections

from qtrain.config.base import base_config
from qtrain.layers.attention import IMPLEMENTATIONS
from qtrain.layers.config import _DTYPES
from qtrain.layers.decoder import REMAT_POLICIES
from qtrain.quant.config import validate_quant


class ConfigError(ValueError):
  """A config field is wrong; the message names it and the fix."""


def _check_keys(cfg, ref, prefix: str) -> None:
  for key in cfg.keys():
    name = f"{prefix}.{key}"
    if key not in ref:
      close = difflib.get_close_matches(key, list(ref.keys()), n=1)
      hint = f"did you mean {prefix}.{close[0]}?" if close else f"known: {sorted(ref.keys())}"
      raise ConfigError(f"{name} is not a config field; {hint}")
    sub, ref_sub = cfg[key], ref[key]
    if isinstance(ref_sub, ml_collections.ConfigDict):
      if not isinstance(sub, ml_collections.ConfigDict):
        raise ConfigError(f"{name} must be a group of fields like {sorted(ref_sub.keys())}")
      _check_keys(sub, ref_sub, name)


def check_override(dotted: str, ref: ml_collections.ConfigDict | None = None) -> None:
  """Raises ConfigError when ``--config.<dotted>=...`` names no config field,
  suggesting the closest path (``trian.steps`` -> ``config.train.steps``).
  Paths below a non-group field (e.g. into ``quant.rules``) are left to the
  config's own checks."""
  node, done = base_config() if ref is None else ref, "config"
  keys = dotted.split(".")
  for i, key in enumerate(keys):
    if not isinstance(node, ml_collections.ConfigDict):
      return
    if key not in node:
      close = difflib.get_close_matches(key, list(node.keys()), n=1)
      hint = (f"did you mean {'.'.join([done, close[0], *keys[i + 1:]])}?" if close
              else f"{done} has {sorted(node.keys())}")
      raise ConfigError(f"--config.{dotted}: {done}.{key} is not a config field; {hint}")
    node, done = node[key], f"{done}.{key}"


def _require(ok: bool, msg: str) -> None:
  if not ok:
    raise ConfigError(msg)


def _check_model(m) -> None:
  _require(m.n_heads > 0 and m.n_kv_heads > 0, "config.model.n_heads and n_kv_heads must be > 0")
  divisors = [k for k in range(1, m.n_heads + 1) if m.n_heads % k == 0]
  _require(m.n_heads % m.n_kv_heads == 0,
           f"config.model.n_kv_heads={m.n_kv_heads} does not divide config.model.n_heads="
           f"{m.n_heads}; choose n_kv_heads among {divisors}")
  _require(m.head_dim % 2 == 0,
           f"config.model.head_dim={m.head_dim} must be even: RoPE rotates pairs of features")
  _require(m.d_model > 0 and m.d_ff > 0 and m.n_layers > 0,
           "config.model.d_model, d_ff and n_layers must be > 0")
  for field in ("dtype", "param_dtype"):
    _require(m[field] in _DTYPES,
             f"config.model.{field}={m[field]!r}; use one of {sorted(_DTYPES)}")
  _require(m.remat_policy in REMAT_POLICIES,
           f"config.model.remat_policy={m.remat_policy!r}; use one of {sorted(REMAT_POLICIES)}")
  unroll = m.get("scan_unroll", 1)  # Absent from configs saved before it existed.
  _require(isinstance(unroll, int) and unroll >= 0,
           f"config.model.scan_unroll={unroll!r}: blocks per loop iteration, an "
           f"int >= 0 (1: a loop over the layers; 0 or n_layers={m.n_layers}: no loop)")
  _require(m.attention_impl in IMPLEMENTATIONS,
           f"config.model.attention_impl={m.attention_impl!r}; use one of {IMPLEMENTATIONS}")
  try:
    from qtrain.layers.weights import form_rules  # pylint: disable=g-import-not-at-top
    form_rules(m.weight_forms)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  # Outlier-safe pretraining (qtrain/layers/norms.py, model.py, hadamard.py).
  from qtrain.layers.hadamard import is_power_of_two  # pylint: disable=g-import-not-at-top
  from qtrain.layers.norms import NORMS  # pylint: disable=g-import-not-at-top
  _require(m.norm in NORMS, f"config.model.norm={m.norm!r}; use one of {NORMS}")
  # fused_*: absent from configs saved before they existed.
  for field in ("embproj", "ffn_hadamard", "fused_qkv", "fused_mlp"):
    _require(isinstance(m.get(field, False), bool),
             f"config.model.{field}={m.get(field)!r}: use True or False")
  lo = 1 << max(m.d_ff.bit_length() - 1, 0)
  _require(not m.ffn_hadamard or is_power_of_two(m.d_ff),
           f"config.model.ffn_hadamard=True needs config.model.d_ff a power of two (the fast "
           f"Walsh-Hadamard transform), got {m.d_ff}; set d_ff={lo} or {2 * lo}, or "
           "ffn_hadamard=False")
  # Rotations (qtrain/layers/rotation.py): kinds, supported sizes, blocks.
  from qtrain.layers.rotation import check_rotation  # pylint: disable=g-import-not-at-top
  try:
    check_rotation(m)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  chunks = m.get("loss_chunks", 0)
  _require(isinstance(chunks, int) and not isinstance(chunks, bool) and chunks >= 0,
           f"config.model.loss_chunks={chunks!r} must be an int >= 0 (0 = the LM head and "
           "loss over the whole [B, T, V] at once)")
  _require(m.rope_scaling.factor >= 1.0,
           f"config.model.rope_scaling.factor={m.rope_scaling.factor} must be >= 1 (1 = off)")
  if m.rope_scaling.factor > 1.0:
    _require(m.rope_scaling.high_freq_factor > m.rope_scaling.low_freq_factor,
             "config.model.rope_scaling.high_freq_factor must exceed low_freq_factor")


def _check_data_train(c, n_devices: int) -> None:
  d, t = c.data, c.train
  _require(d.seq_len <= c.model.max_seq_len,
           f"config.data.seq_len={d.seq_len} exceeds config.model.max_seq_len="
           f"{c.model.max_seq_len}, the longest sequence RoPE positions are set up for; "
           "raise max_seq_len (and rope_theta/rope_scaling) or shorten seq_len")
  _check_mesh(c, n_devices)
  _check_shards(d)
  _check_pipeline(c, n_devices)
  _check_accum(c, n_devices)
  kernels = c.quant.get("kernels", "xla")
  _require(kernels == "xla" or n_devices == 1 or c.quant.mode == "fp8",
           f"config.quant.kernels={kernels!r} on {n_devices} devices with "
           f"mode={c.quant.mode!r}: the int8 kernels take whole operands (XLA would gather "
           "them), so they run on one device for now (fp8's cast+transpose kernel runs per "
           "shard); set config.quant.kernels='xla'")
  h = c.quant.get("amax_history", 0)
  _require(not h or t.step == "first_order",
           f"config.quant.amax_history={h} (delayed fp8 scaling) with config.train.step="
           f"{t.step!r}: its absmaxes come from the first-order step's backward; set "
           "amax_history=0 (current scaling) or step='first_order'")
  _require(t.nan_policy in ("skip", "stop"),
           f"config.train.nan_policy={t.nan_policy!r}; use 'skip' or 'stop'")
  _require(t.steps > 0, f"config.train.steps={t.steps} must be > 0")
  for field in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    _require(t[field] > 0, f"config.train.{field}={t[field]} must be > 0")
  _check_optim_and_step(c)


def _check_shards(d) -> None:
  """``config.data.shards``: each shard's batch is a whole number of rows.
  Against the process count: ``qtrain/train/loop.py`` (and the checkpoint)."""
  n = d.get("shards", 0)
  _require(isinstance(n, int) and not isinstance(n, bool) and n >= 0,
           f"config.data.shards={n!r} must be an int >= 0 (0 = one per process)")
  both = math.gcd(d.global_batch_size, d.eval_batch_size)
  for field in ("global_batch_size", "eval_batch_size"):
    _require(not n or d[field] % n == 0,
             f"config.data.shards={n} does not divide config.data.{field}={d[field]} (each "
             f"shard gives {field} / shards rows); use shards among "
             f"{[k for k in range(1, both + 1) if both % k == 0]}")


def _check_mesh(c, n_devices: int) -> None:
  """The mesh against the devices, the model and the batch; notes printed."""
  from qtrain.parallel.mesh import MeshError, check_mesh  # pylint: disable=g-import-not-at-top
  try:
    notes = check_mesh(c.mesh, n_devices, c.model, c.data)
  except MeshError as e:
    raise ConfigError(str(e)) from None
  if notes and jax.process_index() == 0:
    print("\n".join(notes), flush=True)


def _check_accum(c, n_devices: int) -> None:
  """``config.train.grad_accum_steps``: the first-order step splits each
  device's rows into that many microbatches (qtrain/train/first_order.py)."""
  from qtrain.parallel.mesh import mesh_sizes  # pylint: disable=g-import-not-at-top
  k, t = c.train.get("grad_accum_steps", 1), c.train
  _require(isinstance(k, int) and not isinstance(k, bool) and k >= 1,
           f"config.train.grad_accum_steps={k!r} must be an int >= 1 (1 = no accumulation)")
  if k == 1:
    return
  _require(t.step == "first_order",
           f"config.train.grad_accum_steps={k} needs config.train.step='first_order' (got "
           f"{t.step!r}, which does not accumulate); set grad_accum_steps=1 or use first_order")
  _require(not tuple(t.collect),
           f"config.train.grad_accum_steps={k} with config.train.collect={tuple(t.collect)}: "
           "sown values are not combined over microbatches; set collect=() or "
           "grad_accum_steps=1 (telemetry works: config.telemetry)")
  s = mesh_sizes(c.mesh, n_devices)
  rows, n = s["data"] * s["fsdp"], c.data.global_batch_size
  per_device = n // rows
  other = (f" or a grad_accum_steps dividing {per_device} (the rows per device)"
           if per_device > 1 else "")
  _require(n % (k * rows) == 0,
           f"config.data.global_batch_size={n} is not a multiple of config.train."
           f"grad_accum_steps x config.mesh.data x fsdp = {k} x {rows} = {k * rows} (each "
           "device splits its rows into grad_accum_steps microbatches); use global_batch_size="
           f"{max(k * rows, n // (k * rows) * k * rows)}{other}")


def _check_pipeline(c, n_devices: int) -> None:
  """``config.train.pipeline_*`` against the mesh, the model and the batch
  (qtrain/parallel/pipeline.py); combinations not built are refused."""
  from qtrain.parallel.mesh import mesh_sizes  # pylint: disable=g-import-not-at-top
  from qtrain.parallel.pipeline import SCHEDULES  # pylint: disable=g-import-not-at-top
  t, s = c.train, mesh_sizes(c.mesh, n_devices)
  p = s["pipeline"]
  if p == 1:
    _require(t.step != "pipeline", "config.train.step='pipeline' needs config.mesh.pipeline > "
             "1; set the mesh's pipeline size or use step='first_order'")
    return
  _require(t.step == "pipeline", f"config.mesh.pipeline={p} needs config.train.step="
           f"'pipeline' (got {t.step!r}); set it, or set config.mesh.pipeline=1")
  k = t.get("grad_accum_steps", 1)
  _require(k == 1, f"config.train.grad_accum_steps={k} with config.mesh.pipeline={p}: the "
           "pipeline splits the batch into microbatches itself; set grad_accum_steps=1 and "
           f"config.train.pipeline_microbatches={k * p}")
  name, m, v = t.pipeline_schedule, t.pipeline_microbatches, t.pipeline_repeats
  _require(name in SCHEDULES,
           f"config.train.pipeline_schedule={name!r}; use one of {SCHEDULES}")
  _require(isinstance(m, int) and m >= 0, f"config.train.pipeline_microbatches={m!r} must "
           "be an int >= 1 (0 = config.mesh.pipeline)")
  m = m or p
  rows = s["data"] * s["fsdp"]
  per_shard = c.data.global_batch_size // rows
  _require(per_shard % m == 0,
           f"config.train.pipeline_microbatches={m} does not divide the {per_shard} rows per "
           f"data x fsdp shard (config.data.global_batch_size={c.data.global_batch_size} over "
           f"{rows}); use global_batch_size={rows * m * max(1, per_shard // m)} or fewer "
           "microbatches")
  if name in ("circular", "interleaved_1f1b"):
    one = {"circular": "gpipe", "interleaved_1f1b": "1f1b"}[name]
    _require(isinstance(v, int) and not isinstance(v, bool) and v >= 2,
             f"config.train.pipeline_repeats={v!r} must be an int >= 2 for pipeline_schedule="
             f"{name!r} (1 is {one!r}: set config.train.pipeline_schedule={one!r})")
    _require(c.model.n_layers % (p * v) == 0,
             f"config.model.n_layers={c.model.n_layers} does not split into config.mesh."
             f"pipeline x config.train.pipeline_repeats = {p} x {v} stages; choose repeats "
             f"dividing {c.model.n_layers // p}")
    fits = [k for k in range(p, per_shard + 1, p) if per_shard % k == 0]
    _require(m % p == 0, f"config.train.pipeline_microbatches={m} must be a multiple of "
             f"config.mesh.pipeline={p} for {name!r} (microbatches circulate in groups of p); "
             + (f"use one of {fits}" if fits else
                f"raise config.data.global_batch_size to a multiple of {rows * p}"))
  cp = c.model.get("context_parallel", "none")
  _require(cp == "none" or s["sequence"] == 1,
           f"config.model.context_parallel={cp!r} with config.mesh.pipeline={p}: context-"
           "parallel attention inside a pipeline stage is not built; set context_parallel="
           "'none' or pipeline=1")
  _require(not tuple(t.collect), f"config.train.collect={tuple(t.collect)} with config.mesh."
           f"pipeline={p}: the stages do not return sown collections; set collect=()")
  _require(not c.telemetry.get("every", 0), f"config.telemetry.every={c.telemetry.every} with "
           f"config.mesh.pipeline={p}: the stages do not sow telemetry; set every=0")


def _check_loss_chunks(c) -> None:
  """``config.model.loss_chunks`` against the sequence and the LM head's
  quantizer (qtrain/train/loss.py): a chunk is a strided subset of each row's
  tokens, so a scale the head computes over tokens would be per chunk."""
  n = c.model.get("loss_chunks", 0)
  if not n:
    return
  _require(c.data.seq_len % n == 0,
           f"config.model.loss_chunks={n} does not divide config.data.seq_len={c.data.seq_len} "
           f"(each chunk takes every {n}-th token of a row); choose loss_chunks among "
           f"{[k for k in range(1, min(c.data.seq_len, 64) + 1) if c.data.seq_len % k == 0]}")
  if c.quant.mode == "none" or c.quant.get("stage", "qat") == "ptq":
    return
  from qtrain.quant.config import named_rules, rules_from_config  # pylint: disable=g-import-not-at-top
  from qtrain.quant.rules import first_match  # pylint: disable=g-import-not-at-top
  rules = rules_from_config(c.quant)
  i = first_match(rules, "lm_head")
  if i is None or (rules[i].act is None and rules[i].weight is None):
    return
  where = named_rules(c.quant)[i][0]
  act = rules[i].act
  _require(act is None or act.granularity != "tensor" or act.learned,
           f"{where}.act.granularity='tensor' quantizes the LM head's input with one scale "
           f"over all tokens, which config.model.loss_chunks={n} would compute per chunk; use "
           "act granularity 'token', a learned step, or loss_chunks=0")
  _require(c.quant.mode == "fake" or not c.quant.get("int8_backward", True),
           f"config.quant.mode={c.quant.mode!r} quantizes the LM head's dY for dW with scales "
           f"over tokens, which config.model.loss_chunks={n} would compute per chunk; set "
           "config.quant.int8_backward=False, leave lm_head out of the rules, or loss_chunks=0")


def _check_optim_and_step(c) -> None:
  """The optimizer and step-family packages check their own groups (imported
  here, not at the top: they import this module's ConfigError)."""
  from qtrain.optim.validate import validate_optim  # pylint: disable=g-import-not-at-top
  from qtrain.train.families import validate_step  # pylint: disable=g-import-not-at-top
  validate_optim(c)
  validate_step(c)


def validate(cfg: ml_collections.ConfigDict, n_devices: int = 1) -> None:
  """Raises ConfigError naming the first wrong field."""
  _check_keys(cfg, base_config(), "config")
  _check_model(cfg.model)
  _check_data_train(cfg, n_devices)
  try:
    validate_quant(cfg.quant, cfg.model)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check_loss_chunks(cfg)
  from qtrain.analysis.telemetry import validate_telemetry  # pylint: disable=g-import-not-at-top
  validate_telemetry(cfg)

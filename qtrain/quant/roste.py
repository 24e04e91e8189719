"""RoSTE's lower level (which blocks to rotate) and the quantized evaluation of
a fine-tuned run (Wei et al., ICML 2025, "Rotated straight-through estimator").

Lower level. RoSTE picks the rotations minimising the quantization error

    E = sum_i ||Q_w(R_i^T W_i) - R_i^T W_i||^2
        + (1/n) sum_i sum_j ||Q_x(X_ij R_i) - X_ij R_i||^2

over n calibration samples j, from the pretrained weights, once (K = 1), with
R_i either the identity or a random Hadamard. With X_ij taken from the
unquantized model's forward pass, E is a sum of per-matmul terms, so the
minimum is the per-(matmul, block) choice of the lower of the two. Here a
sample is one row of a training batch of the fine-tuning task; the squared
errors of its real tokens are summed (padding is left out), and the sum is
divided by the number of rows. The quantizers are the config's own
(``config.quant.rules``: asymmetric, per-token activations, per-channel
weights, the clipping factor), R the very ``qtrain.quant.rotated`` signs the
training provider uses. ``choose_rotations`` writes the table and both errors
to ``<workdir>/roste_rotations.json`` and prints them; ``python -m
qtrain.finetune`` runs it before training when ``config.quant.rotation.choose
= "roste"`` and puts the table in ``config.quant.rotation.table``.

Quantized evaluation. ``quantized_eval`` evaluates a run's final params under
its ``config.quant`` (stage forced to ``qat``): for a QAT run the model as it
trained, for a ``stage = "ptq"`` run the high-precision fine-tune with its
weights round-to-nearest (the same ``qtrain.quant.quantize`` numerics as
``python -m qtrain.quantize --method=rtn``), activations and KV fake-quantized,
and the rotation of ``config.quant.rotation`` (all sites: QuaRot-style). One
function for all five methods of configs/roste, so their numbers compare.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from qtrain.layers import Provider, Transformer
from qtrain.layers.param_tree import get as get_param
from qtrain.quant import quantizer
from qtrain.quant.calibration import sum_sown
from qtrain.quant.config import provider_from_config, validate_quant
from qtrain.quant.provider import choice_per_layer
from qtrain.quant.rotated import rotate, site_signs

COLLECTION = "roste_error"
TERMS = ("w_id", "w_rot", "x_id", "x_rot")


def _sq_err(x, spec, axis):
  """||Q(x) - x||^2 summed over the contraction ``axis``; zeros when no spec."""
  if spec is None:
    return jnp.zeros(x.shape[:axis % x.ndim] + x.shape[axis % x.ndim + 1:], jnp.float32)
  return jnp.sum(jnp.square(quantizer.fake_quant(x, spec, contract_axis=axis) - x), axis=axis)


@dataclasses.dataclass(frozen=True)
class ErrorProvider(Provider):
  """Sows both sides of E at every matmul ``pattern`` matches (identity and
  rotated: weight error, and the activation error summed over real tokens),
  then runs the dot below unchanged (the unquantized model)."""
  rules: tuple
  pattern: str
  seed: int
  where: dict = dataclasses.field(default_factory=dict, compare=False)  # (path, layer) -> scope.

  def dot(self, site, hooks, inner):
    if not re.fullmatch(self.pattern, site.path):
      return inner
    layer = site.layer if site.layer is not None else hooks.layer
    choice = choice_per_layer(self.rules, site.path, site.layered, layer, hooks.n_layers)
    if isinstance(choice, tuple):
      raise ValueError(f"{site.path}: the rules quantize blocks of this scanned stack "
                       "differently; RoSTE's lower level needs one rule per matmul path")
    rule = None if choice is None else self.rules[choice]
    wspec, xspec = (None, None) if rule is None else (rule.weight, rule.act)
    signs = jnp.asarray(site_signs(self.seed, site.path, site.in_features,
                                   hooks.n_layers if site.layered else 1))

    def observed(module, lhs, rhs, dims, precision=None, preferred_element_type=None):
      (lc, rc), _ = dims
      s = signs[layer if site.layered else 0]
      x = jnp.moveaxis(lhs, lc[0], -1).astype(jnp.float32)
      w = rhs.astype(jnp.float32)
      mask = hooks.token_mask
      m = (jnp.ones(x.shape[:-1]) if mask is None
           else jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (x.ndim - 1 - mask.ndim)),
                                 x.shape[:-1]).astype(jnp.float32))
      terms = dict(w_id=jnp.sum(_sq_err(w, wspec, rc[0])),
                   w_rot=jnp.sum(_sq_err(rotate(w, s, rc[0]), wspec, rc[0])),
                   x_id=jnp.sum(m * _sq_err(x, xspec, -1)),
                   x_rot=jnp.sum(m * _sq_err(rotate(x, s), xspec, -1)))
      self.where[(site.path, site.layer)] = tuple(module.scope.path)
      for name, v in terms.items():
        module.sow(COLLECTION, name, v)
      return inner(module, lhs, rhs, dims, precision, preferred_element_type)

    return observed


def rotation_errors(model_cfg, quant_cfg, params, batches) -> dict:
  """{path: {"identity": [E per block], "hadamard": [...]}} of every matmul
  ``config.quant.rotation.sites`` matches; ``batches``: dicts of ``inputs``
  (+ ``positions``, ``segment_ids``) [B, T]."""
  rot = quant_cfg.rotation
  provider = ErrorProvider(rules=validate_quant(quant_cfg), pattern=rot.sites, seed=int(rot.seed))
  total, n_batches, rows = sum_sown(Transformer(model_cfg, provider), COLLECTION, params,
                                    batches, dtype=jnp.float32)
  if total is None:
    raise ValueError("RoSTE's lower level needs at least one calibration batch")
  out = {}
  for (path, layer), scope in sorted(provider.where.items(), key=lambda kv: (kv[0][0],
                                                                             kv[0][1] or 0)):
    node = get_param(total, scope)
    t = {k: np.atleast_1d(np.asarray(node[k][0], np.float64)) for k in TERMS}
    e_id = t["w_id"] / n_batches + t["x_id"] / rows  # Weight terms: once per batch.
    e_rot = t["w_rot"] / n_batches + t["x_rot"] / rows
    entry = out.setdefault(path, {"identity": [], "hadamard": []})
    entry["identity"] += [float(v) for v in e_id]
    entry["hadamard"] += [float(v) for v in e_rot]
  return out


def choose(errors: dict) -> dict[str, str]:
  """The lower E per block: {path: "0110"}, 1 = rotate (ties keep the identity)."""
  return {path: "".join("1" if h < i else "0" for i, h in zip(e["identity"], e["hadamard"]))
          for path, e in errors.items()}


def format_choice(table: dict[str, str], errors: dict) -> str:
  """The table as printed: one line per matmul path, blocks left to right."""
  lines = ["RoSTE rotation choice (1 = random Hadamard, 0 = identity) per block:"]
  for path, bits in table.items():
    gain = sum(min(i, h) for i, h in zip(errors[path]["identity"], errors[path]["hadamard"]))
    base = sum(errors[path]["identity"])
    lines.append(f"  {path:<32} {bits}   E {base:.4g} -> {gain:.4g}")
  n_on = sum(b.count("1") for b in table.values())
  n_all = sum(len(b) for b in table.values())
  lines.append(f"  {n_on} of {n_all} (matmul, block) pairs rotated")
  return "\n".join(lines)


def choose_rotations(cfg, workdir: str) -> dict[str, str]:
  """RoSTE's lower level for ``cfg`` (init_from = the pretrained run): E on
  ``config.quant.rotation.calib_batches`` training batches, the table written
  to ``<workdir>/roste_rotations.json`` (reused when it exists, so a resumed
  run keeps its choice) and printed."""
  from qtrain.data import loader  # pylint: disable=g-import-not-at-top
  from qtrain.data.global_batch import to_global  # pylint: disable=g-import-not-at-top
  from qtrain.parallel import Layout, data_shard  # pylint: disable=g-import-not-at-top
  from qtrain.quantize.evaluate import restore_params  # pylint: disable=g-import-not-at-top
  from qtrain.train.build import model_config  # pylint: disable=g-import-not-at-top
  from qtrain.train.checkpoint import load_config  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "roste_rotations.json")
  rot = cfg.quant.rotation
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    print(format_choice(saved["table"], saved["errors"]) + f"\n  (from {path})", flush=True)
    return saved["table"]
  source = load_config(cfg.train.init_from)
  layout = Layout.for_checkpoint(source)
  d, model_cfg = cfg.data, model_config(cfg)
  with layout:
    params, step = restore_params(cfg.train.init_from, source, layout.mesh)
    shard, shards = data_shard(layout.mesh)
    it = loader.make_train_iterator(d.dir, seq_len=d.seq_len, global_batch_size=d.global_batch_size,
                                    seed=cfg.seed + 1, process_index=shard, process_count=shards)
    batches = [to_global(next(it), layout.mesh, model_cfg) for _ in range(rot.calib_batches)]
    errors = rotation_errors(model_cfg, cfg.quant, params, batches)
  table = choose(errors)
  print(format_choice(table, errors), flush=True)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump({"table": table, "errors": errors, "init_from": cfg.train.init_from,
                 "init_step": step, "calib_batches": rot.calib_batches,
                 "samples": rot.calib_batches * d.global_batch_size, "seed": rot.seed}, f,
                indent=2)
    os.replace(path + ".tmp", path)
  return table


def quantized_eval(workdir: str) -> dict:
  """Held-out loss and perplexity of the run's latest params under its
  ``config.quant`` applied (stage ``qat``, rotation included); written to
  ``<workdir>/quantized_eval.json``."""
  from qtrain.data import loader  # pylint: disable=g-import-not-at-top
  from qtrain.parallel import Layout, data_shard  # pylint: disable=g-import-not-at-top
  from qtrain.quantize.evaluate import perplexity, restore_params  # pylint: disable=g-import-not-at-top
  from qtrain.train.build import model_config  # pylint: disable=g-import-not-at-top
  from qtrain.train.checkpoint import load_config  # pylint: disable=g-import-not-at-top
  cfg = load_config(workdir)
  d = cfg.data
  model = Transformer(model_config(cfg), provider_from_config(cfg.quant, cfg.model, stage="qat"))
  layout = Layout.for_checkpoint(cfg)
  with layout:
    params, step = restore_params(workdir, cfg, layout.mesh)
    shard, shards = data_shard(layout.mesh)
    batches = loader.make_eval_batches(d.dir, seq_len=d.seq_len, global_batch_size=d.eval_batch_size,
                                       num_batches=d.eval_batches, process_index=shard,
                                       process_count=shards)
    nll, ppl = perplexity(model, params, batches, layout.mesh, d.seq_len)
  q = cfg.quant
  result = {"step": step, "loss": nll, "ppl": ppl, "eval_batches": len(batches),
            "stage": q.get("stage", "qat"), "mode": q.mode,
            "rotation": (q.rotation.to_dict() if q.get("rotation") is not None else None)}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "quantized_eval.json"), "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
  return result


def format_eval(r: dict) -> str:
  rot = r.get("rotation") or {}
  how = "no rotation" if not rot.get("sites") else f"rotation {rot.get('choose')}"
  return (f"quantized ({r['stage']}, {how}) held-out loss {r['loss']:.4f}, perplexity "
          f"{r['ppl']:.2f} over {r['eval_batches']} batches (step {r['step']})")

"""benchmarks/zo_memory.py: each variant really gets its method (step family,
update rule, groups, quantizers), the CPU fallback's byte count against the
bytes of a program whose buffers are known, the AdamW row's optimizer state
against 2 x the params' bytes (Adam's two float32 moments), and the report's
ratios and MeZO verdict against hand-computed ones."""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import zo_memory as zm

SMOKE = "llama_1b:smoke"


def _args(**kw):
  base = dict(model=SMOKE, batch=2, seq=16, remat="", steps=1, warmup=0, compile_only=True,
              variant="")
  return argparse.Namespace(**{**base, **kw})


def test_each_variant_gets_its_method():
  fwd = zm.variant_config(_args(), "forward")
  assert fwd.train.step == "first_order" and fwd.quant.mode == "none"
  mezo = zm.variant_config(_args(), "mezo")
  assert (mezo.train.step, mezo.optim.name, mezo.zo.estimator) == ("zeroth_order", "sgd", "spsa")
  assert mezo.optim.grad_clip == 0 and mezo.model.d_model == fwd.model.d_model  # Model kept.
  fg = zm.variant_config(_args(), "forward_grad")
  assert fg.zo.estimator == "forward" and fg.model.attention_impl == "xla"
  assert zm.variant_config(_args(), "blockwise").zo.blockwise
  assert zm.variant_config(_args(), "zo_adam").optim.name == "adamw"
  assert zm.variant_config(_args(), "adamw").train.step == "first_order"
  zq = zm.variant_config(_args(), "zeroqat_w4a16")
  assert zq.quant.mode == "fake" and zq.quant.rules.linears.weight.bits == 4
  assert [g["optimizer"] for g in zq.optim.groups if "optimizer" in g] == ["frozen"]


def test_planned_bytes_of_a_known_program():
  """x [256, 256] float32 = 256 KiB: x * 2 holds x and the output (512 KiB);
  donated, the output aliases x (256 KiB). Exact: no temporaries in one fusion."""
  x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
  kib = 256 * 256 * 4
  assert zm.planned_bytes(jax.jit(lambda a: a * 2).lower(x).compile()) == 2 * kib
  assert zm.planned_bytes(jax.jit(lambda a: a * 2, donate_argnums=0).lower(x).compile()) == kib


def test_adamw_row_holds_two_moments(capsys):
  zm.child(_args(variant="adamw"))
  row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  # Adam's mu and nu in float32 (the params' dtype) plus scalar counts.
  assert 0 <= row["optimizer_bytes"] - 2 * row["params_bytes"] <= 64
  assert row["planned_bytes"] > 3 * row["params_bytes"] and row["forwards"] == 3


def _row(name, mem, ms, peak=True):
  return {"variant": name, "optimizer_bytes": 0, "planned_bytes": 7 * mem,
          "peak_bytes": mem if peak else None, "forwards": 2, "step_ms": ms}


@pytest.mark.parametrize("peak", [True, False])
def test_report_ratios(peak):
  rows = [_row("forward", 100, 10.0, peak), _row("adamw", 400, 30.0, peak),
          _row("mezo", 115, 25.0, peak)]
  text = zm.report(rows)
  mezo = next(l for l in text.splitlines() if l.startswith("mezo "))
  # 115 / 100 and 115 / 400 whichever key is used (planned is 7x both), 25 / 10 ms.
  assert mezo.split()[3:5] == ["1.15", "0.29"] and mezo.split()[-1] == "2.50"
  assert "target <= 1.2: met" in text
  assert ("peak_bytes_in_use" in text) == peak
  rows[2] = _row("mezo", 130, 25.0, peak)
  assert "NOT met" in zm.report(rows)


def test_mezo_plan_within_target_at_a_small_llama_shape(monkeypatch, capsys):
  """The issue's target (MeZO <= 1.2x the forward pass) on XLA's plan at a
  shape whose balance is llama_1b's: llama_1b:smoke (d 128, GQA 8:1) with
  llama_1b's 22 layers and vocab 2000, 4 x 256 tokens, so the layers hold 88%
  of the params (llama_1b: 88%) and the params are 0.39 of the forward plan
  (llama_1b: 0.25). Measured on CPU: 1.07x (llama_1b: 1.03x; with the
  whole-tree perturbation it was 1.46x)."""
  load = zm.load_config

  def shaped(name):
    cfg = load(name)
    # The block loop, as measured: unrolled (the llama configs' default since
    # 2026-11-24) the forward's plan holds more at once (0.29 of it is params).
    cfg.model.update(n_layers=22, vocab_size=2000, scan_unroll=1)
    return cfg

  monkeypatch.setattr(zm, "load_config", shaped)
  rows = {}
  for name in ("forward", "mezo"):
    zm.child(_args(variant=name, batch=4, seq=256))
    rows[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert rows["mezo"]["params_bytes"] / rows["forward"]["planned_bytes"] > 0.3
  ratio = rows["mezo"]["planned_bytes"] / rows["forward"]["planned_bytes"]
  assert ratio <= zm.MEZO_TARGET, ratio

"""Memory-efficient pretraining (issue 11): the base of the configs in this
folder, which differ only in optimizer, weight form and restarts.

  python -m qtrain.sweep --configs='configs/optim/*.py' --workdir=runs/optim_cpu
  python -m qtrain.sweep --configs='configs/optim/*.py:125m' --workdir=runs/optim_125m
  python -m qtrain.train --config=configs/optim/galore.py:smoke --workdir=/tmp/galore

Sizes (the variant): none = the `make train` model (configs/default.py: d 192,
4 layers, data/kjv, 300 steps); ``125m`` = configs/llama_125m.py:corpus
(data/debian_en, 64 x 1024 tokens a step, 1600 steps); ``smoke`` =
configs/default.py:smoke for tests. Other variants (quant presets) pass through.

Choices, the papers' where they transfer (../shared/PAPERS.md):
* Projecting optimizers (GaLore, Fira, APOLLO) and low-rank forms act on the
  decoder's attention and MLP projections; embedding, LM head and norms stay
  dense on AdamW, as in GaLore, SLTrain and Glentis et al.
* Rank d_model / 4 everywhere (GaLore and SLTrain at 1B: 512 of 2048).
* GaLore's subspace update is scaled by 0.25 and its group's lr multiplied by
  4, so lr * scale is AdamW's rate (GaLore's lr 0.01 with scale 0.25 is the
  same arrangement); Fira and APOLLO use scale 1 (APOLLO-Mini: sqrt(128)).
* Restarts every 200 updates (Glentis et al.), 100 on the 300-step CPU run;
  the projection refresh gap is the same, so resets fall on refreshes.
  ``restarts=True`` is both halves; ``reset`` (momentum reset) and
  ``refactor`` (weight refactorization) alone are the paper's ablation.
"""

from qtrain.config.variants import ablation_config
from qtrain.layers.weights import FORMS

HIDDEN = r"decoder/layers(_\d+)?/(attn|mlp)/[a-z]+_proj/.*"
FORMS_AT = r"decoder/layers/(attn|mlp)/.*"
LOW_RANK_NOT_KV = r"decoder/layers/(attn/(q|o)_proj|mlp/.*)"
# The comparison points: {config file: recipe} (one file each in this folder).
RECIPES = {
    "adamw": dict(),
    "galore": dict(optimizer="galore"),
    "fira": dict(optimizer="fira"),
    "apollo": dict(optimizer="apollo"),
    "apollo_mini": dict(optimizer="apollo", apollo_mode="mini"),
    "low_rank": dict(form="low_rank"),
    "low_rank_restarts": dict(form="low_rank", restarts=True),
    "sltrain_restarts": dict(form="sparse_low_rank", restarts=True),
}
# Glentis et al.'s ablation: each half of restarts alone. Not comparison
# points of the memory benchmark: neither changes what a step holds.
ABLATIONS = {
    "low_rank_reset": dict(form="low_rank", reset=True),
    "low_rank_refactor": dict(form="low_rank", refactor=True),
}
PROJECTING = ("galore", "fira", "apollo")  # Optimizers with rank and update_proj_gap.
SWITCHES = dict(optimizer=("adamw", *PROJECTING), form=tuple(FORMS), restarts=(False, True),
                reset=(False, True), refactor=(False, True), apollo_mode=("apollo", "mini"))


def get_config(arg: str = "", *, recipe: str):
  """``configs/optim/<recipe>.py`` at the size the variant names."""
  points = {**RECIPES, **ABLATIONS}
  if recipe not in points:
    raise ValueError(f"configs/optim/{recipe}.py: no recipe {recipe!r} in "
                     f"configs/optim/_base.py; known: {sorted(points)}")
  c, _ = ablation_config(arg)
  apply_recipe(c, **points[recipe])
  return c


def check_switches(switches: dict) -> None:
  """ValueError naming a misspelt switch or value of a recipe (before a run
  silently trains the wrong point)."""
  for k, v in switches.items():
    if k not in SWITCHES:
      raise ValueError(f"configs/optim/_base.py: unknown recipe switch {k}={v!r}; "
                       f"switches: {sorted(SWITCHES)}")
    # `is`/type, not ==: 1 == True would let reset=1 through as a switch.
    if not any(v is ok or (type(v) is type(ok) and v == ok) for ok in SWITCHES[k]):
      raise ValueError(f"configs/optim/_base.py: recipe switch {k}={v!r} must be one of "
                       f"{list(SWITCHES[k])}")
  if switches.get("apollo_mode", "apollo") != "apollo" and switches.get("optimizer") != "apollo":
    raise ValueError("configs/optim/_base.py: apollo_mode needs optimizer='apollo'")
  if ((switches.get("restarts") or switches.get("refactor"))
      and switches.get("form", "dense") == "dense"):
    raise ValueError("configs/optim/_base.py: refactorization (restarts or refactor) re-splits "
                     "low-rank factors; it needs form='low_rank' or 'sparse_low_rank', or use "
                     "reset=True alone")


def apply_recipe(c, **switches) -> None:
  """Sets one point of the comparison on any config ``c`` (benchmarks/optim_memory.py
  applies them to llama_1b): ``optimizer`` on the hidden matrices, their weight
  ``form`` (dense | low_rank | sparse_low_rank), and ``restarts`` (both of
  ``reset``, momentum reset, and ``refactor``, refactorization). ``SWITCHES``
  lists each switch's values; the first is its default."""
  check_switches(switches)
  s = {k: v[0] for k, v in SWITCHES.items()} | switches
  optimizer, form = s["optimizer"], s["form"]
  every = 100 if c.train.steps <= 300 else 200
  rank = c.model.d_model // 4
  if form != "dense":
    # Factor only where r < min(in, out): grouped-query k/v projections
    # (n_kv_heads * head_dim wide) stay dense when they are that narrow.
    m = c.model
    pattern = FORMS_AT if m.n_kv_heads * m.head_dim > rank else LOW_RANK_NOT_KV
    rule = dict(pattern=pattern, form=form, rank=rank)
    if form == "sparse_low_rank":
      rule["density"] = 0.03  # SLTrain's delta.
      # One product x @ (A B + S) per layer, as SLTrain's code: the step saves
      # the dense model's activations (three products saved 1.6x at 125M).
      rule["merged"] = True
    c.model.weight_forms = (rule,)
  if optimizer != "adamw":
    group = c.optim[optimizer]
    group.update(rank=rank, update_proj_gap=every)
    lr_mult = 1.0
    if optimizer == "galore":
      lr_mult = 1.0 / group.scale
    if optimizer == "apollo" and s["apollo_mode"] == "mini":
      group.update(mode="mini", rank=1, scale=128 ** 0.5)
    c.optim.groups = (dict(pattern=HIDDEN, optimizer=optimizer, lr_mult=lr_mult),
                      dict(pattern=r".*", optimizer="adamw"))
  if s["restarts"] or s["reset"]:
    c.optim.restarts.every = every
  if s["restarts"] or s["refactor"]:
    c.optim.refactor.every = every

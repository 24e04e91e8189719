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
"""

from qtrain.config.variants import ablation_config

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


def get_config(arg: str = "", *, recipe: str):
  """``configs/optim/<recipe>.py`` at the size the variant names."""
  c, _ = ablation_config(arg)
  apply_recipe(c, **RECIPES[recipe])
  return c


def apply_recipe(c, *, optimizer: str = "adamw", form: str = "dense", restarts: bool = False,
                 apollo_mode: str = "apollo") -> None:
  """Sets one point of the comparison on any config ``c`` (benchmarks/optim_memory.py
  applies them to llama_1b): ``optimizer`` on the hidden matrices, their weight
  ``form`` (dense | low_rank | sparse_low_rank), and restarts (momentum reset
  + refactorization)."""
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
    c.model.weight_forms = (rule,)
  if optimizer != "adamw":
    group = c.optim[optimizer]
    group.update(rank=rank, update_proj_gap=every)
    lr_mult = 1.0
    if optimizer == "galore":
      lr_mult = 1.0 / group.scale
    if optimizer == "apollo" and apollo_mode == "mini":
      group.update(mode="mini", rank=1, scale=128 ** 0.5)
    c.optim.groups = (dict(pattern=HIDDEN, optimizer=optimizer, lr_mult=lr_mult),
                      dict(pattern=r".*", optimizer="adamw"))
  if restarts:
    c.optim.restarts.every = every
    c.optim.refactor.every = every

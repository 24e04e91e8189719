"""Outlier-safe pretraining (OSP, Park et al. ACL 2025): the base of the five
ablation configs in this folder, which differ only in optimizer, norm and EmbProj.

  python -m qtrain.sweep --configs='configs/osp/*.py' --workdir=runs/osp       # CPU
  python -m qtrain.sweep --configs='configs/osp/*.py:125m' --workdir=runs/osp_125m
  python -m qtrain.train --config=configs/osp/osp.py:smoke --workdir=/tmp/osp

Sizes (the variant): none = the `make train` model (configs/default.py: d 192,
4 layers, data/kjv, 300 steps); ``125m`` = configs/llama_125m.py:corpus
(data/debian_en, 64 x 1024 tokens a step); ``smoke`` = configs/default.py:smoke
for tests. Other variants (quant presets, e.g. ``w4a4``) pass through.

Learning rate: one for both optimizers, the size's AdamW rate (3e-3 here, 1.5e-3
at 125m). Muon scales each update to RMS 0.2 * lr (``config.optim.muon.rms_scale``,
0.2 * sqrt(max(A, B)) times the orthogonalised momentum), AdamW's typical update
RMS, so it reuses AdamW's lr and weight decay (Liu et al. 2025, Moonlight), and
the runs differ only in what the ablation names. Weight decay 0.1 for all.
"""

from qtrain.config.variants import ablation_config
from qtrain.optim.muon import osp_groups


def get_config(arg: str = "", *, muon: bool, norm: str = "rmsnorm", embproj: bool = False):
  """The ablation point: Muon (OSP's partition) or AdamW everywhere; the norm
  (rmsnorm | ssnorm) and EmbProj."""
  c, _ = ablation_config(arg)
  c.model.update(norm=norm, embproj=embproj)
  if muon:  # Hidden matrices and EmbProj: Muon; embedding, LM head, norms, steps: AdamW.
    c.optim.groups = osp_groups()
  return c

"""The configs/optim recipes (issue 11): one file per point, each one switch
from its neighbour, and Glentis et al.'s ablation (momentum reset alone,
refactorization alone) doing what its name says in the optimizer it builds.

References: the sweep's own glob (qtrain.sweep.runs.expand) and the resume
check's field diff (qtrain.train.resume.differing_fields) for the structure;
Adam's moment recursion from zero state, m = (1 - b1) g and v = (1 - b2) g^2
(Kingma & Ba 2015, Alg. 1), and the balanced split A^T A = B B^T = S of
Glentis et al. 2025 in float64 NumPy for the behaviour.
"""

from __future__ import annotations

import ast
import os

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from optim_util import namedtuples
from qtrain.config.variants import config_module
from qtrain.optim import build_optimizer
from qtrain.optim.groups import param_path
from qtrain.sweep.runs import expand
from qtrain.train.build import build_model
from qtrain.train.resume import differing_fields
from qtrain.train.state import abstract_params

ROOT = os.path.join(os.path.dirname(__file__), "..")
BASE = config_module("optim._base")
POINTS = {**BASE.RECIPES, **BASE.ABLATIONS}


def _config(name: str, variant: str = ""):
  return config_module(f"optim.{name}").get_config(variant)


def test_the_sweep_glob_runs_every_point_and_only_those():
  os.chdir(ROOT)  # expand() globs relative paths, as the sweep command does.
  files = expand("configs/optim/*.py")
  assert [os.path.basename(f)[:-3] for f in files] == sorted(POINTS)
  assert not set(BASE.RECIPES) & set(BASE.ABLATIONS)


@pytest.mark.parametrize("name", sorted(POINTS))
def test_each_file_is_its_recipe_with_its_command(name):
  path = os.path.join(ROOT, "configs", "optim", f"{name}.py")
  doc = ast.get_docstring(ast.parse(open(path).read()))
  assert "configs/optim/_base.py" in doc, doc
  assert (f"python -m qtrain.train --config=configs/optim/{name}.py "
          f"--workdir=runs/optim/{name}") in doc, doc
  assert _config(name).to_dict() == BASE.get_config("", recipe=name).to_dict()


# Each point against its neighbour: exactly these fields differ. The restart
# period is 100 updates on the 300-step CPU run, 200 at 125m (1600 steps).
NEIGHBOURS = [
    ("low_rank", "low_rank_reset", {"optim.restarts.every"}),
    ("low_rank", "low_rank_refactor", {"optim.refactor.every"}),
    ("low_rank", "low_rank_restarts", {"optim.restarts.every", "optim.refactor.every"}),
    ("low_rank_restarts", "sltrain_restarts", {"model.weight_forms"}),
    ("adamw", "low_rank", {"model.weight_forms"}),
]


@pytest.mark.parametrize("variant, every", [("", 100), ("125m", 200)])
@pytest.mark.parametrize("a, b, fields", NEIGHBOURS)
def test_ablation_points_are_one_switch_apart(a, b, fields, variant, every):
  ca, cb = _config(a, variant), _config(b, variant)
  assert set(differing_fields(ca, cb)) == fields
  for f in fields:
    if f.endswith(".every"):
      group = f.split(".")[1]
      assert cb.optim[group].every == every and ca.optim[group].every == 0


@pytest.mark.parametrize("switches, message", [
    (dict(form="low_rank", rest=True), "unknown recipe switch rest=True"),
    (dict(form="low_rank", reset=1), "recipe switch reset=1 must be one of [False, True]"),
    (dict(form="low_rnak"), "recipe switch form='low_rnak' must be one of"),
    (dict(optimizer="galroe"), "recipe switch optimizer='galroe' must be one of"),
    (dict(optimizer="galore", apollo_mode="mini"), "apollo_mode needs optimizer='apollo'"),
    (dict(refactor=True), "it needs form='low_rank' or 'sparse_low_rank'"),
    (dict(restarts=True), "it needs form='low_rank' or 'sparse_low_rank'"),
])
def test_a_misspelt_switch_fails_naming_it(switches, message):
  c = config_module("default").get_config("smoke")
  with pytest.raises(ValueError, match="configs/optim/_base.py") as e:
    BASE.apply_recipe(c, **switches)
  assert message in str(e.value), str(e.value)


def test_an_unknown_recipe_names_the_file():
  with pytest.raises(ValueError, match=r"configs/optim/low_rank_rst.py: no recipe"):
    BASE.get_config("", recipe="low_rank_rst")


# ------------------------------------------------------------- behaviour --

def _run(name: str, every: int, n_updates: int, seed: int = 0):
  """Params and Adam moments after ``n_updates`` of the optimizer that
  configs/optim/<name>.py:smoke builds, with its nonzero restart periods set
  to ``every`` (cheap), from random params and small random grads (below the
  global-norm clip, so Adam sees the raw grads)."""
  c = _config(name, "smoke")
  for group in ("restarts", "refactor"):
    if c.optim[group].every:
      c.optim[group].every = every
  boxed = abstract_params(build_model(c), c.data.seq_len)
  tx = build_optimizer(c, boxed)
  shapes = nn.unbox(boxed)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), shapes)
  grads = [jax.tree.map(lambda s: rng.normal(0, 1e-4, s.shape).astype(np.float32), shapes)
           for _ in range(n_updates)]
  state = tx.init(params)
  step = jax.jit(tx.update)
  for g in grads:
    updates, state = step(g, state, params)
    params = optax.apply_updates(params, updates)
  adam = [x for x in namedtuples(state) if type(x).__name__ == "ScaleByAdamState"]
  assert len(adam) == 1, [type(x).__name__ for x in namedtuples(state)]
  return _flat(params), _flat(adam[0].mu), _flat(adam[0].nu), [_flat(g) for g in grads]


def _flat(tree) -> dict:
  return {param_path(p): np.asarray(x, np.float64)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}




def _pairs(params: dict) -> list[tuple[str, str]]:
  return [(p, p[:-1] + "b") for p in params if p.endswith("/a")]


def test_reset_alone_restarts_adam_moments_and_leaves_factors_unbalanced():
  """every=2: the third update starts from zero moments, so after it Adam's
  m = (1 - b1) g3 and v = (1 - b2) g3^2 for every param; a run without the
  reset keeps g1 and g2 in them. No refactorization: A^T A != B B^T."""
  b1, b2 = 0.9, 0.95
  params, mu, nu, grads = _run("low_rank_reset", every=2, n_updates=3)
  _, mu_off, _, _ = _run("low_rank", every=2, n_updates=3)
  g3 = grads[2]
  assert set(mu) == set(g3) and _pairs(params)
  for p in g3:
    # 1e-6 relative: one float32 multiply-add of zeros and g from the reference.
    np.testing.assert_allclose(mu[p], (1 - b1) * g3[p], rtol=1e-6, atol=1e-12, err_msg=p)
    np.testing.assert_allclose(nu[p], (1 - b2) * g3[p] ** 2, rtol=1e-5, atol=1e-20, err_msg=p)
  terms = [(1 - b1) * b1 ** k * grads[2 - k]["embedding"] for k in range(3)]
  # Float32 rounding of a sum is relative to its terms, not to the sum (they
  # may cancel): 1e-6 of sum |term| (a few float32 ulps).
  assert (np.abs(mu_off["embedding"] - sum(terms))
          <= 1e-6 * sum(np.abs(t) for t in terms)).all()
  assert np.abs(mu_off["embedding"] - mu["embedding"]).max() > 1e-2 * np.abs(mu["embedding"]).max()
  a, b = _pairs(params)[0]
  gram_a = np.einsum("...ir,...is->...rs", params[a], params[a])
  gram_b = np.einsum("...ri,...si->...rs", params[b], params[b])
  assert np.abs(gram_a - gram_b).max() > 1e-2 * np.abs(gram_a).max()


def test_refactor_alone_balances_factors_keeps_products_and_moments():
  """every=2: after the second update every low-rank pair is re-split with
  A^T A = B B^T diagonal (= S), and A B equals the product of the same two
  updates without refactorization (low_rank: the same inner AdamW); the
  moments are those of a run with no restarts at all."""
  params, mu, _, _ = _run("low_rank_refactor", every=2, n_updates=2)
  plain, mu_off, _, _ = _run("low_rank", every=2, n_updates=2)
  pairs = _pairs(params)
  assert pairs
  for a, b in pairs:
    gram_a = np.einsum("...ir,...is->...rs", params[a], params[a])
    gram_b = np.einsum("...ri,...si->...rs", params[b], params[b])
    scale = np.abs(gram_a).max()
    # 1e-4 of the largest singular value: float32 QR + SVD of a rank-48 product.
    np.testing.assert_allclose(gram_a, gram_b, atol=1e-4 * scale, err_msg=a)
    off_diag = gram_a - np.einsum("...ii->...i", gram_a)[..., None] * np.eye(gram_a.shape[-1])
    assert np.abs(off_diag).max() < 1e-4 * scale, a
    np.testing.assert_allclose(params[a] @ params[b], plain[a] @ plain[b],
                               atol=1e-4 * np.abs(plain[a] @ plain[b]).max(), err_msg=a)
  for p in mu:
    np.testing.assert_array_equal(mu[p], mu_off[p], err_msg=p)

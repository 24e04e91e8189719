"""The params tree by key path: one home for reading, writing, copying and
pruning nested param dicts (PTQ export, PTQ sites, checkpoint conversion).

A key path is a tuple of dict keys from the root, as ``MatmulSite.param``
gives it: ``("decoder", "layers", "attn", "q_proj", "kernel")``.
"""

from __future__ import annotations


def get(tree, key_path):
  """The node at ``key_path``."""
  for k in key_path:
    tree = tree[k]
  return tree


def put(tree: dict, key_path, value) -> None:
  """Sets the leaf at ``key_path``, creating dicts on the way."""
  for k in key_path[:-1]:
    tree = tree.setdefault(k, {})
  tree[key_path[-1]] = value


def copy_tree(tree):
  """A copy of the dict structure (leaves shared)."""
  return {k: copy_tree(v) if isinstance(v, dict) else v for k, v in tree.items()}


def without(tree: dict, key_paths) -> dict:
  """``tree`` without the leaves at ``key_paths`` (and dicts left empty)."""
  drop = {tuple(p) for p in key_paths}

  def walk(node, prefix):
    out = {}
    for k, v in node.items():
      p = (*prefix, k)
      if p in drop:
        continue
      v = walk(v, p) if isinstance(v, dict) else v
      if not (isinstance(v, dict) and not v):
        out[k] = v
    return out
  return walk(tree, ())

"""Config variants named after the colon: ``configs/default.py:smoke,w4a4``.

A variant string is a comma-separated list; each config file handles its own
size variants (``smoke``) and passes the rest here, where a name of a preset
in ``configs/quant/`` (``w8a8``, ``w4a4kv4``, ...) sets ``config.quant``.
A preset's own switches follow a ``+``: ``w4a4+lm_head`` quantizes the LM head.
"""

from __future__ import annotations

import importlib
import pathlib
import sys

QUANT_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs" / "quant"


def quant_presets() -> list[str]:
  return sorted(p.stem for p in QUANT_DIR.glob("*.py") if p.stem not in ("base", "__init__"))


def config_module(name: str):
  """``configs/<name>.py`` as a module (``"llama_125m"``, ``"osp._base"``), so a
  config file can build on another wherever the process was started."""
  root = str(QUANT_DIR.parents[1])
  if root not in sys.path:
    sys.path.insert(0, root)
  return importlib.import_module(f"configs.{name}")


def ablation_config(arg: str, large: tuple[str, str] = ("llama_125m", "corpus")):
  """The config an ablation point builds on: ``configs/default.py`` (the
  `make train` model; ``smoke`` and quant variants pass through) or, with the
  variant ``125m``, ``configs/<large[0]>.py:<large[1]>`` plus the other
  variants. Returns (config, "125m" or "")."""
  variants = split_variants(arg)
  rest = [v for v in variants if v != "125m"]
  if "125m" in variants:
    name, size = large
    return config_module(name).get_config(",".join([size, *rest])), "125m"
  return config_module("default").get_config(",".join(rest)), ""


def apply_variants(c, variants: list[str], config_name: str) -> None:
  """Applies non-size variants (quantization presets) to config ``c``."""
  for v in variants:
    name, _, switches = v.partition("+")
    if name not in quant_presets():
      raise ValueError(f"{config_name}: unknown variant {v!r}; use 'smoke' or a quant "
                       f"preset {quant_presets()}")
    preset = config_module(f"quant.{name}")  # Presets import `configs.quant.base`.
    c.quant = preset.get_quant(switches.replace("+", ","))


def split_variants(arg: str) -> list[str]:
  return [t.strip() for t in arg.split(",") if t.strip()]

"""Forward gradient (Baydin et al. 2022; ZO-Bench's FG): g = dL/dp . z from one
jax.jvp, SGD. Needs a model without custom VJPs: no quantizers, XLA attention.

  python -m qtrain.finetune --config=configs/zo/forward_grad.py --init_from=runs/default \
      --workdir=runs/zo/forward_grad
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  c = config_module("zo._base").get_config(arg, rule="sgd", lr=1e-4, estimator="forward",
                                              cpu_lr=3e-3)
  c.model.attention_impl = "xla"  # cuDNN's attention is a custom VJP: jvp cannot enter it.
  return c

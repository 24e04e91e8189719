"""Helpers of the tests against Hugging Face transformers (the reference)."""

import jax
import numpy as np
import torch

from qtrain.layers import Transformer


def randomize(model, bias_std: float | None = None):
  """Weights of std 0.15 (well above HF's 0.02) and norm gains 1 + 0.3 N(0, 1),
  so a wrong mapping moves logits by O(1); biases N(0, bias_std) when given."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif bias_std is not None and name.endswith("bias"):
        p.normal_(0.0, bias_std)
      else:
        p.normal_(0.0, 0.15)
  return model


def hf_logits(model, tokens_BT):
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens_BT)).long()).logits.numpy()


def qtrain_logits(cfg, params, tokens_BT):
  return np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, tokens_BT))


def numpy_state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

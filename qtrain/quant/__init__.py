"""Quantization: specs, numerics, gradient estimators, calibration, the
quantized matmul, the provider that places it by rules, and config."""

from qtrain.quant.config import provider_from_config, quant_config_defaults, validate_quant
from qtrain.quant.dot_general import MODES, DotSpec, QuantDotGeneral, quant_dot
from qtrain.quant.estimators import clipped_ste, fake_quant_ste, lsq, lsq_grad_scale, lsq_plus, ste
from qtrain.quant.lsq_init import calibrate_learned_steps, learned_step_paths
from qtrain.quant.provider import QuantProvider
from qtrain.quant.quantizer import QTensor, dequantize, fake_quant, grid, quantize
from qtrain.quant.rules import QuantRule
from qtrain.quant.spec import QuantSpec

"""Quantization: specs, numerics, gradient estimators, calibration, the
quantized dot-general injected into every weight matmul, rules and config."""

from qtrain.quant.config import (provider_from_config, quant_config_defaults, validate_quant,
                                 weight_matmuls)
from qtrain.quant.dot_general import MODES, QuantDotGeneral, QuantProvider
from qtrain.quant.estimators import clipped_ste, fake_quant_ste, lsq, lsq_grad_scale, lsq_plus, ste
from qtrain.quant.quantizer import QTensor, dequantize, fake_quant, grid, quantize
from qtrain.quant.rules import QuantRule
from qtrain.quant.spec import QuantSpec

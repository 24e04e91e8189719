"""Post-training quantization of a trained run and its export.

RTN (``rtn``) through ``qtrain.quant``'s quantizers; GPTQ and AWQ
(``gptq_awq``) with qwix.contrib's statistics and AWQ scale search; the
quantized-weights format on disk (``export``); held-out evaluation of the
unquantized and the PTQ model (``evaluate``). The CLI is ``python -m
qtrain.quantize`` (see ``__main__``).
"""

from qtrain.quantize.awq_fold import InputScale
from qtrain.quantize.export import (QuantizedWeight, dequantize_weight, dequantized_params,
                                    load_export, load_packed, load_quantized, packed_params,
                                    ptq_providers, save_quantized)
from qtrain.quantize.gptq_awq import (StatsProvider, collect_stats, gptq, quantize_awq,
                                      quantize_awq_group, quantize_gptq, quantize_params,
                                      qwix_how)
from qtrain.quantize.rtn import WeightSite, quantize_params_rtn, quantize_rtn, weight_sites

"""Former home of the Hugging Face conversion, now ``qtrain.convert.hf``
(Llama and Qwen2); kept so existing imports keep working."""

from qtrain.convert.hf import *  # noqa: F401,F403  pylint: disable=wildcard-import,unused-wildcard-import
from qtrain.convert.hf import (config_from_hf, load_hf_checkpoint, params_from_hf_model,  # noqa: F401
                               params_from_hf_state_dict, params_to_hf_state_dict)

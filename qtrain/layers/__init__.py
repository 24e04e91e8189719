"""Flax linen layers of the Llama-family decoder; every weight matmul goes
through the one matmul hook (``qtrain.layers.dot_general.Matmul``) and the
providers of ``qtrain.layers.hooks``."""

from qtrain.layers.attention import Attention, dot_product_attention
from qtrain.layers.config import ModelConfig, RopeScaling, RotationConfig
from qtrain.layers.decoder import REMAT_POLICIES, Block, Decoder
from qtrain.layers.dot_general import DotGeneral, HighPrecision, Matmul
from qtrain.layers.hooks import Hooks, MatmulSite, Provider, as_hooks, canonical_path
from qtrain.layers.linear import Linear
from qtrain.layers.mlp import MLP
from qtrain.layers.model import Transformer
from qtrain.layers.hadamard import fold_ffn_hadamard, fwht
from qtrain.layers.norms import RMSNorm, SSNorm, norm_for
from qtrain.layers.registry import ModelSites, config_sites, trace_sites
from qtrain.layers.rope import apply_rope, inverse_frequencies
from qtrain.layers.rotation import (LearnedRotation, hadamard_matrix, hadamard_transform,
                                    random_signs, supported)
from qtrain.layers.weights import FORMS, Dense, FormRule, LowRank, WeightForm, form_rules

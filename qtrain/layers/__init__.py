"""Flax linen layers of the Llama-family decoder; every weight matmul goes
through the injected dot-general of ``qtrain.layers.dot_general``."""

from qtrain.layers.attention import Attention, dot_product_attention
from qtrain.layers.config import ModelConfig, RopeScaling
from qtrain.layers.decoder import REMAT_POLICIES, Block, Decoder
from qtrain.layers.dot_general import DotGeneral, DotGeneralProvider, HighPrecision
from qtrain.layers.linear import Linear
from qtrain.layers.mlp import MLP
from qtrain.layers.model import Transformer
from qtrain.layers.norms import RMSNorm
from qtrain.layers.rope import apply_rope, inverse_frequencies

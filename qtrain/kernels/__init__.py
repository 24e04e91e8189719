"""Pallas low-bit kernels (issue 16): int8 x int8 and packed-int4 matmuls with
fused scales, a fast Walsh-Hadamard transform, and the dispatcher that picks
a kernel or its XLA reference by backend and shape at trace time."""

from qtrain.kernels.fwht import hadamard, hadamard_xla
from qtrain.kernels.int4 import int4_matmul, int4_matmul_xla, pack_int4, quantize_int4, unpack_int4
from qtrain.kernels.int8 import Blocks, int8_matmul, int8_matmul_xla

__all__ = ["Blocks", "hadamard", "hadamard_xla", "int4_matmul", "int4_matmul_xla", "int8_matmul",
           "int8_matmul_xla", "pack_int4", "quantize_int4", "unpack_int4"]

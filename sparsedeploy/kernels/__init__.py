"""sparse-cpu: the project's own compressed weight format (bitmask16) and native sparse matmul kernels.

from sparsedeploy.kernels import pack, unpack, matmul
p = pack(w)                 # w: float32 [N, K], nn.Linear layout
y = matmul(x, p, threads=2) # x: float32 [B, K] -> [B, N] = x @ w.T
"""

from sparsedeploy.kernels.format import LAYOUT, PackedLinear, byte_bound_ceiling, pack, unpack
from sparsedeploy.kernels.native import available_isas, best_isa, matmul

__all__ = ["LAYOUT", "PackedLinear", "available_isas", "best_isa", "byte_bound_ceiling", "matmul", "pack", "unpack"]

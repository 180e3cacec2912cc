"""fused_mbconv: fused GPU kernels for EfficientNet's MBConv blocks, as torch ops.

    import fused_mbconv
    block = fused_mbconv.nn.DWConvBNAct(96, kernel_size=3, stride=2)
    with fused_mbconv.backend("triton"):
        y = block(x)
"""

from fused_mbconv import nn, ops
from fused_mbconv.backend import available_backends, backend, get_backend, set_backend

__version__ = "0.1.0"

__all__ = ["nn", "ops", "available_backends", "backend", "get_backend", "set_backend", "__version__"]

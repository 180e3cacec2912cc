"""fused_mbconv: fused GPU kernels for EfficientNet's MBConv blocks, as torch ops.

    import fused_mbconv
    model = fused_mbconv.efficientnet_b0(weights="efficientnet_b0.pth")   # torchvision's layout
    model, summary = fused_mbconv.convert(existing_model)                 # or fuse a model you have
    block = fused_mbconv.nn.DWConvBNAct(96, kernel_size=3, stride=2)
    with fused_mbconv.backend("triton"):
        y = block(x)
    run = fused_mbconv.cuda_graphed(forward, example)                    # replay from a CUDA graph
"""

from fused_mbconv import models, nn, ops
from fused_mbconv.backends import available_backends, backend, get_backend, set_backend
from fused_mbconv.convert import ConversionSummary, convert, revert
from fused_mbconv.graphs import cuda_graphed
from fused_mbconv.models import (
    efficientnet_b0,
    efficientnet_b1,
    efficientnet_b2,
    efficientnet_b3,
    efficientnet_b4,
    efficientnet_b5,
    efficientnet_b6,
    efficientnet_b7,
)

__version__ = "0.1.0"

__all__ = [
    "nn",
    "ops",
    "models",
    "available_backends",
    "backend",
    "get_backend",
    "set_backend",
    "convert",
    "revert",
    "ConversionSummary",
    "cuda_graphed",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_b4",
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "__version__",
]

"""The fused_mbconv torch ops (namespace ``fused_mbconv``), one subpackage per op family.

Importing this registers every op with torch.library; call them as ``torch.ops.fused_mbconv.*``
or through the Python names re-exported here.
"""

from fused_mbconv.ops.dwconv_bn_silu import (
    dwconv_bn_silu,
    dwconv_bn_silu_backward,
    dwconv_bn_silu_train,
)
from fused_mbconv.ops.project_bn import project_bn, project_bn_backward, project_bn_train
from fused_mbconv.ops.running_stats import fold_batch_norm, update_running_stats
from fused_mbconv.ops.squeeze_excite import (
    se_excite,
    se_excite_backward,
    se_scale,
    se_scale_backward,
    se_squeeze,
)

__all__ = [
    "dwconv_bn_silu",
    "dwconv_bn_silu_train",
    "dwconv_bn_silu_backward",
    "se_squeeze",
    "se_excite",
    "se_excite_backward",
    "se_scale",
    "se_scale_backward",
    "project_bn",
    "project_bn_train",
    "project_bn_backward",
    "update_running_stats",
    "fold_batch_norm",
]

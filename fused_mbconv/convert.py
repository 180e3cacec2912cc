"""convert(model): swap the fusable parts of an existing model for the fused modules, in place;
revert(model): give back plain PyTorch modules (for TorchScript and ONNX export).

What is recognised (everything else is left as it is, and the summary says why):

- an ``nn.Sequential`` of exactly [depthwise Conv2d, BatchNorm2d, SiLU] (torchvision's
  Conv2dNormActivation, fused_mbconv's reverted blocks) -> ``DWConvBNAct`` over the same modules;
  of exactly [1x1 Conv2d, BatchNorm2d, SiLU] (expansions, the head) -> ``ExpandBNAct``; of exactly
  [1x1 Conv2d, BatchNorm2d] (projections) -> ``ProjectBN``;
- torchvision's SqueezeExcitation with SiLU and sigmoid (and fused_mbconv's PlainSqueezeExcite)
  -> ``SqueezeExcite`` over the same fc1/fc2;
- torchvision's MBConv -> ``fused_mbconv.models.MBConv`` over the same block, which hands the
  depthwise kernel's squeeze to the SE and the SE gate, stochastic depth and the residual to the
  projection's GEMM;
- timm's InvertedResidual and DepthwiseSeparableConv (EfficientNet, MobileNet families) with a
  SiLU depthwise stage -> ``FusedTimmBlock`` over the same children.

Every replacement holds the very Parameter and buffer objects of what it replaces under the same
state_dict keys, so optimizers, their state and checkpoints keep working. It remembers the module
it replaced, which ``revert`` puts back.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from fused_mbconv.models.layers import Conv2dSame, PlainSqueezeExcite
from fused_mbconv.models.mbconv import MBConv
from fused_mbconv.models.timm_block import FusedTimmBlock
from fused_mbconv.nn import DWConvBNAct, ExpandBNAct, ProjectBN, SqueezeExcite, is_fusable, is_pointwise_bn

_TIMM_BLOCKS = "timm.models._efficientnet_blocks"


@dataclass
class ConversionSummary:
    """What ``convert`` did: ``converted`` (module path, what it became) and ``left`` (module path,
    why not) for every depthwise conv and squeeze-excite it did not fuse."""

    converted: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many modules became each fused type."""
        return dict(Counter(what for _, what in self.converted))

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} modules, left {len(self.left)}"]
        lines += [f"  {n} x {what}" for what, n in self.counts().items()]
        lines += [f"  left {path or '<root>'}: {why}" for path, why in self.left]
        return "\n".join(lines)


def convert(model: nn.Module) -> tuple[nn.Module, ConversionSummary]:
    """Swap in the fused modules in place; returns (model, summary). ``model`` is returned because
    the root itself may be replaced (when it is one of the recognised modules)."""
    summary = ConversionSummary()
    reasons: dict[str, str] = {}
    model = _convert(model, "", summary, reasons)
    _report_left(model, summary, reasons)
    return model, summary


def revert(model: nn.Module) -> nn.Module:
    """Put plain PyTorch modules back in place (the ones ``convert`` replaced, or for natively
    fused models their unfused equivalents), sharing the same Parameters; returns the model."""
    for name, child in list(model.named_children()):
        plain = revert(child)
        if plain is not child:
            setattr(model, name, plain)
    original: Optional[nn.Module] = model.__dict__.get("_original")
    if original is not None:
        for name, child in model.named_children():  # children may have been reverted themselves
            if name in original._modules:
                original._modules[name] = child
        return original.train(model.training)
    if isinstance(model, DWConvBNAct):
        return nn.Sequential(_self_padding_conv(model), model[1], model[2]).train(model.training)
    if isinstance(model, SqueezeExcite):
        return PlainSqueezeExcite(model.fc1, model.fc2).train(model.training)
    if isinstance(model, (ProjectBN, ExpandBNAct)):
        return nn.Sequential(*model).train(model.training)
    return model


# ---------------------------------------------------------------------------------------------
# the walk


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _convert(module: nn.Module, path: str, summary: ConversionSummary, reasons: dict[str, str]) -> nn.Module:
    # children first: a block is recognised once its depthwise stage and SE are fused
    for name, child in list(module.named_children()):
        fused = _convert(child, _join(path, name), summary, reasons)
        if fused is not child:
            setattr(module, name, fused)
    for rule in _RULES:
        fused = rule(module, path, reasons)
        if fused is not None:
            fused.__dict__["_original"] = module  # not a submodule: its tensors are already ours
            fused.train(module.training)
            summary.converted.append((path, type(fused).__name__))
            return fused
    return module


def _report_left(model: nn.Module, summary: ConversionSummary, reasons: dict[str, str]) -> None:
    fused = set()
    for m in model.modules():
        if isinstance(m, DWConvBNAct):
            fused.add(id(m[0]))
        elif isinstance(m, FusedTimmBlock):
            fused.add(id(m.depthwise[0]))
            fused.update(id(se) for se in m.se.modules())
    for path, m in model.named_modules():
        if _is_depthwise(m) and id(m) not in fused:
            summary.left.append((path, _reason(path, reasons) or _NOT_IN_KNOWN_FORM))
        elif _looks_like_se(m) and id(m) not in fused and not isinstance(m, SqueezeExcite):
            why = _reason(path, reasons) or f"{type(m).__name__} is not a known squeeze-excite form"
            summary.left.append((path, why))


def _reason(path: str, reasons: dict[str, str]) -> Optional[str]:
    """The reason noted for ``path`` or its nearest ancestor (a left module's own parts: the
    Conv2d's inside a MixedConv2d)."""
    while path:
        if path in reasons:
            return reasons[path]
        path = path.rpartition(".")[0]
    return None


_NOT_IN_KNOWN_FORM = (
    "not in a recognised form (an nn.Sequential of depthwise Conv2d, BatchNorm2d, SiLU; "
    "torchvision's MBConv; timm's InvertedResidual or DepthwiseSeparableConv)"
)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _looks_like_se(m: nn.Module) -> bool:
    return (hasattr(m, "fc1") and hasattr(m, "fc2")) or (hasattr(m, "conv_reduce") and hasattr(m, "conv_expand"))


def _conv_reason(conv: nn.Conv2d) -> str:
    return (
        f"{type(conv).__name__}(kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}, "
        f"dilation {conv.dilation}, bias {conv.bias is not None}) is outside the fused op (square kernel 3 or 5, "
        f"stride 1 or 2, dilation 1, k // 2 or TF 'same' padding, no bias)"
    )


def _is_silu(m: nn.Module) -> bool:
    return isinstance(m, nn.SiLU)


def _is_sigmoid(m: nn.Module) -> bool:  # timm has its own Sigmoid module
    return isinstance(m, nn.Sigmoid) or type(m).__name__ == "Sigmoid"


def _is_class(m: nn.Module, module: str, *names: str) -> bool:
    """Recognise a library's class by its home, without importing the library."""
    return type(m).__module__ == module and type(m).__name__ in names


# ---------------------------------------------------------------------------------------------
# the rules: each returns the fused replacement, or None (noting why when it is a near miss)


def _conv_bn_silu(m: nn.Module, path: str, reasons: dict[str, str]) -> Optional[nn.Module]:
    if isinstance(m, (DWConvBNAct, ExpandBNAct)) or type(m).forward is not nn.Sequential.forward or len(m) != 3:
        return None
    conv, bn, act = m[0], m[1], m[2]
    if is_pointwise_bn(conv, bn) and type(bn) is nn.BatchNorm2d and _is_silu(act):
        return ExpandBNAct.from_modules(conv, bn, act)  # an expansion or head conv
    if not _is_depthwise(conv):
        return None
    if type(bn) is not nn.BatchNorm2d or not _is_silu(act):
        reasons[_join(path, "0")] = (
            f"followed by {type(bn).__name__} and {type(act).__name__}; the fused op is BatchNorm2d then SiLU"
        )
        return None
    if not is_fusable(conv, bn):
        reasons[_join(path, "0")] = _conv_reason(conv)
        return None
    return DWConvBNAct.from_modules(conv, bn, act)


def _conv_bn(m: nn.Module, path: str, reasons: dict[str, str]) -> Optional[nn.Module]:
    """[1x1 Conv2d, BatchNorm2d] (a projection) -> ProjectBN, which an MBConv feeds the SE gate,
    stochastic depth and the residual."""
    if isinstance(m, ProjectBN) or type(m).forward is not nn.Sequential.forward or len(m) != 2:
        return None
    if not (is_pointwise_bn(m[0], m[1]) and type(m[1]) is nn.BatchNorm2d):
        return None
    return ProjectBN.from_modules(m[0], m[1])


def _squeeze_excitation(m: nn.Module, path: str, reasons: dict[str, str]) -> Optional[nn.Module]:
    known = isinstance(m, PlainSqueezeExcite) or _is_class(m, "torchvision.ops.misc", "SqueezeExcitation")
    if not known:
        return None
    if not (_is_silu(m.activation) and _is_sigmoid(m.scale_activation)):
        reasons[path] = (
            f"activation {type(m.activation).__name__} and gate {type(m.scale_activation).__name__}; "
            f"the fused op is SiLU and sigmoid"
        )
        return None
    se = SqueezeExcite(m.fc1.in_channels, m.fc1.out_channels, device="meta")
    se.fc1, se.fc2 = m.fc1, m.fc2
    return se


def _torchvision_mbconv(m: nn.Module, path: str, reasons: dict[str, str]) -> Optional[nn.Module]:
    if not _is_class(m, "torchvision.models.efficientnet", "MBConv"):
        return None
    if not (isinstance(m.block[-3], DWConvBNAct) and isinstance(m.block[-2], SqueezeExcite)):
        return None  # its parts were left, with their reasons; the block itself has nothing to add
    return MBConv(m.block, m.stochastic_depth, m.use_res_connect)


def _timm_block(m: nn.Module, path: str, reasons: dict[str, str]) -> Optional[nn.Module]:
    if _is_class(m, _TIMM_BLOCKS, "InvertedResidual"):
        layout = (("conv_pw", "bn1"), "conv_dw", "bn2", ("conv_pwl", "bn3"))
    elif _is_class(m, _TIMM_BLOCKS, "DepthwiseSeparableConv"):
        layout = ((), "conv_dw", "bn1", ("conv_pw", "bn2"))
    else:
        return None
    why = _timm_block_problem(m, getattr(m, layout[1]), getattr(m, layout[2]))
    if why is not None:
        reasons[_join(path, layout[1])] = why
        reasons[_join(path, "se")] = f"its timm block is left as it is: {why}"
        return None
    return FusedTimmBlock(m, *layout)


def _timm_block_problem(m: nn.Module, conv: nn.Module, bn: nn.Module) -> Optional[str]:
    """Why timm block ``m`` cannot take the fused path, or None."""
    if getattr(m, "conv_s2d", None) is not None:
        return "the block starts with a space-to-depth conv"
    if not isinstance(getattr(m, "aa", None), nn.Identity):
        return "the block anti-aliases after the depthwise conv"
    if not isinstance(conv, nn.Conv2d):  # e.g. MixNet's MixedConv2d: kernels of several sizes
        return f"its depthwise stage is a {type(conv).__name__}, not an nn.Conv2d"
    if not is_fusable(conv, bn):
        return _conv_reason(conv)
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
    if not (_is_silu(act) and isinstance(drop, nn.Identity)):
        return f"its BatchNorm applies {type(act).__name__} (and drop {type(drop).__name__}); the fused op is SiLU"
    se = m.se
    if isinstance(se, nn.Identity):
        return None
    if not (_is_class(se, _TIMM_BLOCKS, "SqueezeExcite") and _is_silu(se.act1) and _is_sigmoid(se.gate)):
        return f"its squeeze-excite {type(se).__name__} is not timm's SqueezeExcite with SiLU and sigmoid"
    return None


def _self_padding_conv(block: DWConvBNAct) -> nn.Conv2d:
    """``block``'s conv if it pads correctly on its own; else a Conv2dSame sharing its weight (a
    DWConvBNAct built with padding="tf" holds an unpadded conv and pads in its own forward)."""
    conv = block[0]
    if block.padding_mode != "tf" or type(conv).__name__ == "Conv2dSame":
        return conv
    same = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, groups=conv.groups,
                      bias=False, device="meta")  # fmt: skip
    same.weight = conv.weight
    return same


_RULES: tuple[Callable[[nn.Module, str, dict[str, str]], Optional[nn.Module]], ...] = (
    _conv_bn_silu,
    _conv_bn,
    _squeeze_excitation,
    _torchvision_mbconv,
    _timm_block,
)

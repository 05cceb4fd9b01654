"""MobileNetV2 (Keras layout, width 1.0) as an image backbone: pixels -> a grid of feature vectors.

The demo vision model's tower (triphase.local.demo_vision converts the weights): 224x224 RGB in
[0, 1] -> a 7x7 grid of 1280-wide features after `out_relu`, i.e. 49 image tokens. Batch norms are
folded into the convolutions at load. Weight names follow the Keras layers ("vision.Conv1.weight",
"vision.block_3_depthwise_BN.running_var", ...) in torch layouts; the channel counts come from the
weights, the strides from MobileNetV2's fixed layout. Stride-2 convolutions pad one row and column
at the bottom and right only, as Keras' ZeroPadding2D before them does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BN_EPS = 1e-3
STRIDE_2_BLOCKS = frozenset({1, 3, 6, 13})  # where the 24-, 32-, 64- and 160-channel groups start
NUM_BLOCKS = 17  # expanded_conv (block 0) and block_1 .. block_16


class _Conv:
    """A convolution with its batch norm folded in, then ReLU6 unless it projects."""

    __slots__ = ("bias", "groups", "relu", "stride", "weight")

    def __init__(self, weights: dict[str, torch.Tensor], conv: str, bn: str, dtype: torch.dtype, *,
                 stride: int = 1, relu: bool = True) -> None:
        weight = weights[f"vision.{conv}.weight"].float()
        scale = weights[f"vision.{bn}.weight"].float() / torch.sqrt(weights[f"vision.{bn}.running_var"].float()
                                                                    + BN_EPS)
        self.weight = (weight * scale[:, None, None, None]).to(dtype)
        self.bias = (weights[f"vision.{bn}.bias"].float() - weights[f"vision.{bn}.running_mean"].float() * scale
                     ).to(dtype)
        self.groups = weight.shape[0] if weight.shape[1] == 1 and weight.shape[0] > 1 else 1  # depthwise
        self.stride = stride
        self.relu = relu

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.weight.shape[-1]
        if kernel > 1:
            x = F.pad(x, (0, 1, 0, 1)) if self.stride == 2 else F.pad(x, (kernel // 2,) * 4)
        x = F.conv2d(x, self.weight, self.bias, stride=self.stride, groups=self.groups)
        return x.clamp(0, 6) if self.relu else x


class MobileNetV2:
    def __init__(self, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.stem = _Conv(weights, "Conv1", "bn_Conv1", dtype, stride=2)
        self.blocks: list[tuple[_Conv | None, _Conv, _Conv, bool]] = []
        for index in range(NUM_BLOCKS):
            name = "expanded_conv" if index == 0 else f"block_{index}"
            expand = _Conv(weights, f"{name}_expand", f"{name}_expand_BN", dtype) if index else None
            stride = 2 if index in STRIDE_2_BLOCKS else 1
            depthwise = _Conv(weights, f"{name}_depthwise", f"{name}_depthwise_BN", dtype, stride=stride)
            project = _Conv(weights, f"{name}_project", f"{name}_project_BN", dtype, relu=False)
            channels_in = expand.weight.shape[1] if expand is not None else depthwise.weight.shape[0]
            residual = stride == 1 and channels_in == project.weight.shape[0]
            self.blocks.append((expand, depthwise, project, residual))
        self.head = _Conv(weights, "Conv_1", "Conv_1_bn", dtype)

    @property
    def output_size(self) -> int:
        return int(self.head.weight.shape[0])

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> [N, (H/32) * (W/32), 1280], row-major over the grid."""
        x = self.stem(pixels.to(self.dtype))
        for expand, depthwise, project, residual in self.blocks:
            y = project(depthwise(expand(x) if expand is not None else x))
            x = x + y if residual else y
        return self.head(x).flatten(2).transpose(1, 2)

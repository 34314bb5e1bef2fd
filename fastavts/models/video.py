"""Video towers: R(2+1)D-18, MC3-18 and R3D-18 (Tran et al. 2018), and a narrow `tiny` one.

The same definitions torchvision ships (models/video/resnet.py), written out here because
torchvision does not import with the CPU build of torch: small blocks (Conv3DSimple,
Conv2Plus1D, Conv3DNoTemporal) handed to one builder. With a 400-way classifier the parameter
counts are R(2+1)D-18 31,505,325; MC3-18 11,695,440; R3D-18 33,371,472 (tested), and the
state-dict keys match torchvision's, so its weights load as they are.

Input (B, 3, T, H, W); output features (B, 512) (tiny: (B, widths[-1])).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import nn


class FactorConv3d(nn.Conv3d):
    """nn.Conv3d (same parameters, same state-dict keys) that, on the CPU, runs two cases as
    the cheaper convolution they equal; oneDNN's 3D kernels are slow on the tiny net's shapes
    (docs/training.md, "Third pass"):

    - a temporal kernel (k, 1, 1), stride and padding in time only: a 2D convolution over
      (time, height * width) of the same memory, (k, 1) kernel;
    - a spatial kernel (1, kh, kw) with a single output position whose window holds the
      whole map (the tiny net's last stage: 2 x 2 -> 1 x 1 at stride 2, then 1 x 1 at 1): the
      other taps meet zero padding, so it is a 1 x 1 convolution over (channel, row, column)
      with the taps that meet the map (their gradients alone are non-zero, as in the full
      convolution).

    Both are cheaper than oneDNN's 3D convolutions for the tiny video tower on a CPU
    (bench/bench_demo_step.py measures it). Anything else, channels-last inputs and every GPU
    input go to nn.Conv3d unchanged."""

    def forward(self, x):
        if (x.device.type == "cpu" and x.dim() == 5 and self.groups == 1
                and self.padding_mode == "zeros" and self.dilation == (1, 1, 1)
                and isinstance(self.padding, tuple) and x.is_contiguous()):
            b, c, t, h, w = x.shape
            (kt, kh, kw), (st, sh, sw), (pt, ph, pw) = self.kernel_size, self.stride, self.padding
            o = self.out_channels
            if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
                y = F.conv2d(x.view(b, c, t, h * w), self.weight.view(o, c, kt, 1), self.bias,
                             (st, 1), (pt, 0))
                return y.view(b, o, y.shape[2], h, w)
            if ((kt, st, pt) == (1, 1, 0) and (h + 2 * ph - kh) // sh == 0
                    and (w + 2 * pw - kw) // sw == 0 and h <= kh - ph and w <= kw - pw):
                # one output position, its window covering the whole map: the taps that meet
                # the map, a 1 x 1 convolution over (channel, row, column)
                taps = self.weight[:, :, 0, ph:ph + h, pw:pw + w].reshape(o, c * h * w, 1, 1)
                xs = x if h == w == 1 else x.permute(0, 1, 3, 4, 2)
                y = F.conv2d(xs.reshape(b, c * h * w, t, 1), taps, self.bias)
                return y.view(b, o, t, 1, 1)
        return super().forward(x)


class Conv3DSimple(nn.Conv3d):
    """Full 3x3x3 convolution (R3D)."""

    def __init__(self, in_planes: int, out_planes: int, midplanes=None, stride: int = 1):
        super().__init__(in_planes, out_planes, kernel_size=3, stride=stride, padding=1,
                         bias=False)

    @staticmethod
    def downsample_stride(stride: int):
        return stride, stride, stride


class Conv3DNoTemporal(FactorConv3d):
    """1x3x3 spatial-only convolution (the upper layers of MC3)."""

    def __init__(self, in_planes: int, out_planes: int, midplanes=None, stride: int = 1):
        super().__init__(in_planes, out_planes, kernel_size=(1, 3, 3), stride=(1, stride, stride),
                         padding=(0, 1, 1), bias=False)

    @staticmethod
    def downsample_stride(stride: int):
        return 1, stride, stride


class Conv2Plus1D(nn.Sequential):
    """A 3x3x3 convolution factored into 1x3x3 spatial and 3x1x1 temporal ones, with
    `midplanes` chosen so the parameter count matches the full 3D convolution's."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: int, stride: int = 1):
        super().__init__(
            FactorConv3d(in_planes, midplanes, kernel_size=(1, 3, 3),
                         stride=(1, stride, stride), padding=(0, 1, 1), bias=False),
            nn.BatchNorm3d(midplanes),
            nn.ReLU(inplace=True),
            FactorConv3d(midplanes, out_planes, kernel_size=(3, 1, 1), stride=(stride, 1, 1),
                         padding=(1, 0, 0), bias=False))

    @staticmethod
    def downsample_stride(stride: int):
        return stride, stride, stride


class Conv2Plus1DSpatialStride(Conv2Plus1D):
    """(2+1)D convolution that downsamples in space only: the tiny net keeps every frame, so
    the embedding can say when things happen (sync needs it)."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: int, stride: int = 1):
        super().__init__(in_planes, out_planes, midplanes, stride)
        self[3].stride = (1, 1, 1)

    @staticmethod
    def downsample_stride(stride: int):
        return 1, stride, stride


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, conv_builder, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        midplanes = (inplanes * planes * 27) // (inplanes * 9 + 3 * planes)
        self.conv1 = nn.Sequential(conv_builder(inplanes, planes, midplanes, stride),
                                   nn.BatchNorm3d(planes), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(conv_builder(planes, planes, midplanes),
                                   nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class BasicStem(nn.Sequential):
    """3x7x7 convolution, spatial stride 2 (R3D, MC3)."""

    def __init__(self, width: int = 64):
        super().__init__(nn.Conv3d(3, width, kernel_size=(3, 7, 7), stride=(1, 2, 2),
                                   padding=(1, 3, 3), bias=False),
                         nn.BatchNorm3d(width), nn.ReLU(inplace=True))


class R2Plus1dStem(nn.Sequential):
    """1x7x7 spatial then 3x1x1 temporal convolution (R(2+1)D); 45 = the (2+1)D midplanes."""

    def __init__(self, width: int = 64, mid: int = 45):
        super().__init__(nn.Conv3d(3, mid, kernel_size=(1, 7, 7), stride=(1, 2, 2),
                                   padding=(0, 3, 3), bias=False),
                         nn.BatchNorm3d(mid), nn.ReLU(inplace=True),
                         FactorConv3d(mid, width, kernel_size=(3, 1, 1), stride=(1, 1, 1),
                                      padding=(1, 0, 0), bias=False),
                         nn.BatchNorm3d(width), nn.ReLU(inplace=True))


class VideoResNet(nn.Module):
    def __init__(self, stem: nn.Module, conv_makers: Sequence, layers: Sequence[int],
                 widths: Sequence[int] = (64, 128, 256, 512), num_classes: int = 0,
                 time_bins: int = 0):
        super().__init__()
        self.inplanes = widths[0]
        self.stem = stem
        for i, (maker, n, w) in enumerate(zip(conv_makers, layers, widths)):
            setattr(self, f"layer{i + 1}", self._make_layer(maker, w, n, stride=1 if i == 0 else 2))
        # time_bins > 0 keeps that many steps of time (averaging space only) in the features
        self.time_bins = time_bins
        self.avgpool = nn.AdaptiveAvgPool3d((time_bins or 1, 1, 1))
        self.out_dim = widths[-1] * max(1, time_bins)
        self.fc = nn.Linear(self.out_dim, num_classes) if num_classes else None
        # frames per time step after the stem and the four stages (stride-2 stages that also
        # stride in time halve it, rounding up: a 3-tap padded convolution)
        self.time_strides = [conv_makers[i].downsample_stride(1 if i == 0 else 2)[0]
                             for i in range(len(layers))]
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def _make_layer(self, conv_builder, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            ds = conv_builder.downsample_stride(stride)
            downsample = nn.Sequential(nn.Conv3d(self.inplanes, planes, kernel_size=1, stride=ds,
                                                 bias=False), nn.BatchNorm3d(planes))
        out = [BasicBlock(self.inplanes, planes, conv_builder, stride, downsample)]
        self.inplanes = planes
        out += [BasicBlock(planes, planes, conv_builder) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def time_steps(self, frames: int) -> int:
        """Time steps left in the last stage's output for a clip of `frames` frames."""
        t = frames
        for st in self.time_strides:
            t = -(-t // st)
        return t

    def forward(self, x):                         # (B, 3, T, H, W)
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x).flatten(1)            # (B, C)
        return self.fc(x) if self.fc is not None else x


def r2plus1d_18(num_classes: int = 0, time_bins: int = 0) -> VideoResNet:
    return VideoResNet(R2Plus1dStem(), [Conv2Plus1D] * 4, [2, 2, 2, 2], num_classes=num_classes,
                       time_bins=time_bins)


def mc3_18(num_classes: int = 0, time_bins: int = 0) -> VideoResNet:
    return VideoResNet(BasicStem(), [Conv3DSimple] + [Conv3DNoTemporal] * 3, [2, 2, 2, 2],
                       num_classes=num_classes, time_bins=time_bins)


def r3d_18(num_classes: int = 0, time_bins: int = 0) -> VideoResNet:
    return VideoResNet(BasicStem(), [Conv3DSimple] * 4, [2, 2, 2, 2], num_classes=num_classes,
                       time_bins=time_bins)


def tiny(num_classes: int = 0, widths: Sequence[int] = (8, 16, 32, 64),
         time_bins: int = 0, stem_stride: int = 2, stem_time_stride: int = 1) -> VideoResNet:
    """A narrow R(2+1)D for CPU runs: one block per stage, strided in space only.
    `stem_stride`: the stem's spatial stride (2 as R(2+1)D; 4 runs the first stage, most of
    the tower's cost on a CPU, at a quarter of the pixels). `stem_time_stride`: the stem's
    temporal convolution's stride (2: the stages see every other time step; the stem's
    3-tap temporal kernel still sees every frame)."""
    stem = R2Plus1dStem(widths[0], mid=max(8, widths[0] * 45 // 64))
    stem[0].stride = (1, stem_stride, stem_stride)
    stem[3].stride = (stem_time_stride, 1, 1)
    net = VideoResNet(stem, [Conv2Plus1DSpatialStride] * 4, [1, 1, 1, 1], widths=widths,
                      num_classes=num_classes, time_bins=time_bins)
    net.time_strides.insert(0, stem_time_stride)   # time_steps() counts the stem's stride
    return net


VIDEO_NETS = {"r2plus1d_18": r2plus1d_18, "mc3_18": mc3_18, "r3d_18": r3d_18, "tiny": tiny}

"""Audio tower: a small VGG-style 2D conv net on the log-mel spectrogram.

Input (B, 1, n_mels, frames) (64 x 128 for a 1.28 s window); four stages of two 3x3 conv +
BN + ReLU, each but the last followed by 2x2 max pooling; global average pooling -> (B, C).
`stem_stride=2` (the tiny net) strides the first convolution: the full-resolution stage was
over half of a CPU training step of the demo, and 20 ms steps still resolve a 40 ms frame.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class AudioNet(nn.Module):
    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512), time_bins: int = 0,
                 stem_stride: int = 1):
        super().__init__()
        layers, c_in = [nn.BatchNorm2d(1)], 1   # the input BN puts dB values on a unit scale
        for i, c in enumerate(widths):
            stride = stem_stride if i == 0 else 1
            layers += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, padding=1, bias=False),
                       nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        # time_bins > 0 keeps that many steps of time (averaging frequency only)
        self.pool = nn.AdaptiveAvgPool2d((1, time_bins or 1))
        self.out_dim = widths[-1] * max(1, time_bins)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):                      # (B, 1, n_mels, frames)
        return self.pool(self.features(x)).flatten(1)   # (B, C)


AUDIO_NETS = {"default": lambda time_bins=0: AudioNet(time_bins=time_bins),
              "tiny": lambda widths=(8, 16, 32, 64), time_bins=0: AudioNet(widths, time_bins,
                                                                           stem_stride=2)}

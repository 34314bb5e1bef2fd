"""Audio tower: a small VGG-style 2D conv net on the log-mel spectrogram.

Input (B, 1, n_mels, frames) (64 x 128 for a 1.28 s window); four stages of two 3x3 conv +
BN + ReLU, each but the last followed by 2x2 max pooling; global average pooling -> (B, C).
`stem_stride=2` (the tiny net) strides the first convolution: the full-resolution stage is the
costliest part of a CPU step, and 20 ms steps still resolve a 40 ms video frame.

The input BN's scale g and shift b are folded into the first convolution's weight W,
conv(g * xhat + b, W) = conv(xhat, g * W) + conv(b * ones, W) (xhat the normalised input, the
second term one single-image convolution: zero padding makes it vary at the borders), so the
backward pass computes no gradient of that convolution's input, the log-mel: on a CPU that
input gradient was the costliest single operation of the demo's step (docs/training.md, "Third
pass"). Same parameters, buffers and state-dict keys as the plain BN -> conv.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _normalized(bn: nn.BatchNorm2d, x):
    """bn(x) without its affine step: the batch-norm statistics, running averages included,
    exactly as nn.BatchNorm2d.forward keeps them."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return F.batch_norm(x, bn.running_mean if keep else None, bn.running_var if keep else None,
                        None, None, use_batch, factor, bn.eps)


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
        bn, conv = self.features[0], self.features[1]
        xhat = _normalized(bn, x)
        y = F.conv2d(xhat, conv.weight * bn.weight.to(conv.weight.dtype), None, conv.stride,
                     conv.padding)
        ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=y.dtype, device=y.device)
        y = y + F.conv2d(ones * bn.bias.to(y.dtype), conv.weight.to(y.dtype), None,
                         conv.stride, conv.padding)
        for layer in list(self.features)[2:]:
            y = layer(y)
        return self.pool(y).flatten(1)   # (B, C)


AUDIO_NETS = {"default": lambda time_bins=0: AudioNet(time_bins=time_bins),
              "tiny": lambda widths=(8, 16, 32, 64), time_bins=0: AudioNet(widths, time_bins,
                                                                           stem_stride=2)}

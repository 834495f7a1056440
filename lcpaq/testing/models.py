"""Tiny real models for tests: fast on CPU, with a residual tie and a concat."""

from __future__ import annotations

import torch
from torch import nn


class TinyResNet(nn.Module):
    """stem conv -> residual block (conv, conv, + identity) -> 1x1 conv -> pool -> fc.

    Tie group: {stem, block.conv2} (their outputs meet at the add); input (1, 3, 16, 16).
    """

    input_shape = (1, 3, 16, 16)

    def __init__(self, width: int = 8, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.proj = nn.Conv2d(width, 2 * width, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(y)) + x)
        x = torch.relu(self.proj(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyConcatNet(nn.Module):
    """Two branches (1x1 and depthwise 3x3) concatenated: {a, b} tie at the cat."""

    input_shape = (1, 4, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1))


class TinyMLP(nn.Module):
    """Two Linear layers on 8 features; used for exact-Hessian checks."""

    input_shape = (4, 8)

    def __init__(self, d_in: int = 8, d_hidden: int = 6, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))

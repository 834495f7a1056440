"""A two-block residual net (stem | 2 x BasicBlock-like | fc) shared by the block-unit tests."""

from __future__ import annotations

import torch


class Block(torch.nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class BlockNet(torch.nn.Module):
    input_shape = (1, 3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.layer = torch.nn.Sequential(Block(8), Block(8))
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.layer(torch.relu(self.stem(x))).mean((2, 3)))

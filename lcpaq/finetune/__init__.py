"""Knowledge-distillation fine-tuning (QAT) of a mixed-precision policy, with resumable checkpoints.

>>> # res = finetune(get_model("mnist_resnet"), policy, train, val, epochs=2, checkpoint_dir="ckpt")
>>> # res.fp32_acc, res.ptq_acc, res.qat_acc
"""

from lcpaq.finetune.kd import FinetuneResult, finetune, kd_loss, load_quantized, save_quantized

__all__ = ["FinetuneResult", "finetune", "kd_loss", "load_quantized", "save_quantized"]

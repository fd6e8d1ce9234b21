"""Knowledge distillation for train.py through timm's `timm.task` (the `--kd-*` flags).

The teacher is a timm model built from ``--kd-model-name`` with the weights of ``--kd-pretrained-path``
(a train.py checkpoint, whose recorded flags give its input size and kwargs, or a bare state dict; never a
hub download). It runs in eval mode without gradients inside timm's `DistillationTeacher`, which
re-normalises the student's input to the teacher's mean / std when they differ. The task computes
``task_loss_weight * task loss + distill_loss_weight * distillation loss`` (timm's weighting rules):

- ``logit``: `LogitDistillationTask`, KL of the temperature-softened logits;
- ``feature``: `FeatureDistillationTask`, MSE of the pooled pre-logits, with a trained linear projection
  when the widths differ (saved as ``kd_projection`` in the student's checkpoints);
- ``token``: `TokenDistillationTask`, for students with a distillation head (``set_distilled_training``).

The teacher is not part of the student's checkpoints.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from timm.task import FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask, TrainingTask
from timm.utils import unwrap_model
from torch import nn

from vig.console import require_model
from vig.errors import UsageError
from vig.model_settings import ModelSettings
from vig.trainer.checkpoint_model import model_from_checkpoint

if TYPE_CHECKING:
    from vig.trainer.config import DistillSection

__all__ = ["build_teacher", "build_distillation_task", "projection_state", "load_projection_state"]

_LOGGER = logging.getLogger(__name__)
PROJECTION_KEY = "kd_projection"


def build_teacher(distill: DistillSection, num_classes: int, device: torch.device,
                  dtype: torch.dtype | None) -> nn.Module:
    """The --kd-model-name teacher with the --kd-pretrained-path weights (strict), eval mode, frozen.

    Its input size and kwargs come from the file's recorded train.py flags unless --kd-model-kwargs sets
    them; its class count must be the student's (``num_classes``): logit and token distillation compare
    the two over the same classes.
    """
    require_model(distill.kd_model_name)
    given = ModelSettings(model=distill.kd_model_name, num_classes=num_classes,
                          model_kwargs=dict(distill.kd_model_kwargs))
    teacher, settings = model_from_checkpoint(distill.kd_pretrained_path, given, flag="--kd-pretrained-path",
                                              label="teacher")
    teacher.to(device=device, dtype=dtype)
    teacher.eval()
    teacher.requires_grad_(False)
    _LOGGER.info("KD teacher %s (%d classes, img_size %s, model_kwargs %s) loaded from %s", distill.kd_model_name,
                 num_classes, settings.img_size, settings.model_kwargs, distill.kd_pretrained_path)
    return teacher


def build_distillation_task(distill: DistillSection, student: nn.Module, teacher: nn.Module,
                            criterion: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                            device: torch.device, dtype: torch.dtype | None, verbose: bool) -> TrainingTask:
    """The timm.task distillation task of --kd-distill-type around ``student`` (not yet DDP-wrapped).

    ``mean`` / ``std`` are the student's normalisation as this run's data pipeline applies it (which
    --mean / --std may set): the task's student buffers are set to them, so that the teacher's
    re-normalisation starts from what the batches really hold.
    """
    common: dict[str, Any] = {"student_model": student, "teacher_model": teacher, "criterion": criterion,
                              "distill_loss_weight": distill.distill_loss_weight,
                              "task_loss_weight": distill.task_loss_weight, "device": device, "dtype": dtype,
                              "verbose": verbose}
    try:
        if distill.kd_distill_type == "logit":
            task = LogitDistillationTask(temperature=distill.kd_temperature, **common)
        elif distill.kd_distill_type == "feature":
            task = FeatureDistillationTask(**common)
        else:
            task = TokenDistillationTask(distill_type=distill.kd_token_distill_type, temperature=distill.kd_temperature,
                                         **common)
    except ValueError as err:  # e.g. a student without a distillation head for token distillation
        raise UsageError(f"--kd-distill-type {distill.kd_distill_type}: {' '.join(str(err).split())}") from None
    float_dtype = dtype or torch.float32
    task.student_mean = torch.tensor(mean, device=device, dtype=float_dtype).view(1, -1, 1, 1)
    task.student_std = torch.tensor(std, device=device, dtype=float_dtype).view(1, -1, 1, 1)
    return task


def projection_state(task: TrainingTask | None) -> dict[str, torch.Tensor] | None:
    """The feature projection's weights (feature distillation with differing widths), else None."""
    if not isinstance(task, FeatureDistillationTask):
        return None
    projection = unwrap_model(task.get_trainable_module()).projection
    return projection.state_dict() if projection is not None else None


def load_projection_state(task: TrainingTask | None, state: dict[str, Any], path: str) -> None:
    """Restore the feature projection from a resumed checkpoint's ``kd_projection`` entry."""
    if not isinstance(task, FeatureDistillationTask):
        return
    projection = unwrap_model(task.get_trainable_module()).projection
    if projection is None:
        return
    saved = state.get(PROJECTION_KEY)
    if not isinstance(saved, dict):
        raise UsageError(f"--resume: {path} has no {PROJECTION_KEY} (the feature-distillation projection)")
    projection.load_state_dict(saved)

"""Per-step schedules (DINOv2): LR with linear warm-up then cosine, cosine weight decay, teacher
momentum cosine to its final value, linear teacher-temperature warm-up."""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(step: int, start: float, end: float, total: int, warmup_steps: int = 0, warmup_start: float = 0.0) -> float:
    """Linear from ``warmup_start`` to ``start`` over ``warmup_steps``, then cosine from ``start`` to ``end`` at ``total``."""
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    span = max(1, total - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """DINOv2's square-root scaling: ``base_lr * sqrt(batch / 1024)``."""
    return base_lr * math.sqrt(global_batch / 1024)


@dataclass(frozen=True)
class Schedules:
    total: int
    lr: float
    min_lr: float
    warmup: int
    wd: float
    wd_end: float
    momentum: float
    momentum_end: float
    teacher_temp: float
    warmup_teacher_temp: float
    warmup_teacher_temp_steps: int
    freeze_last_layer_steps: int

    @classmethod
    def from_config(cls, cfg) -> "Schedules":
        o, lo, t = cfg.optim, cfg.loss, cfg.train
        return cls(t.steps, scaled_lr(o.base_lr, t.batch_size), o.min_lr, min(o.warmup_steps, t.steps), o.weight_decay,
                   o.weight_decay_end, o.momentum_teacher, o.momentum_teacher_end, lo.teacher_temp,
                   lo.warmup_teacher_temp, lo.warmup_teacher_temp_steps, o.freeze_last_layer_steps)

    def at(self, step: int) -> dict:
        if step < self.warmup_teacher_temp_steps:
            temp = self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * step / self.warmup_teacher_temp_steps
        else:
            temp = self.teacher_temp
        return {
            "lr": cosine(step, self.lr, self.min_lr, self.total, self.warmup),
            "wd": cosine(step, self.wd, self.wd_end, self.total),
            "momentum": cosine(step, self.momentum, self.momentum_end, self.total),
            "teacher_temp": temp,
            "freeze_last_layer": step < self.freeze_last_layer_steps,
        }

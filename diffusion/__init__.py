"""Diffusion processes and noise schedules. Pure math: imports torch only, never models/ or transformers."""
from .absorbing import AbsorbingDiffusion, LossOutput, SampleOutput, categorical_float64, filter_logits
from .schedules import SCHEDULES, SPINDLE_FORMS, Cosine, Mutual, Schedule, Spindle, make_schedule

__all__ = ["AbsorbingDiffusion", "LossOutput", "SampleOutput", "categorical_float64", "filter_logits",
           "SCHEDULES", "SPINDLE_FORMS", "Cosine", "Mutual", "Schedule", "Spindle", "make_schedule"]

"""Diffusion processes and noise schedules. Pure math: imports torch only, never models/ or transformers."""
from .absorbing import AbsorbingDiffusion, LossOutput, SampleOutput, categorical_float64, filter_logits
from .gaussian import GAUSSIAN_SCHEDULES, GaussianDiffusion, GaussianLossOutput, Respaced, gaussian_betas
from .respacing import ADAPTIVE_DECAY_PROPORTIONS, adaptive_decay_timesteps, parse_respacing, uniform_timesteps
from .schedules import SCHEDULES, SPINDLE_FORMS, Cosine, Mutual, Schedule, Spindle, make_schedule
from .timestep_samplers import TIMESTEP_SAMPLERS, LossAwareSampler, UniformSampler, make_timestep_sampler

__all__ = ["AbsorbingDiffusion", "LossOutput", "SampleOutput", "categorical_float64", "filter_logits",
           "GAUSSIAN_SCHEDULES", "GaussianDiffusion", "GaussianLossOutput", "Respaced", "gaussian_betas",
           "ADAPTIVE_DECAY_PROPORTIONS", "adaptive_decay_timesteps", "parse_respacing", "uniform_timesteps",
           "SCHEDULES", "SPINDLE_FORMS", "Cosine", "Mutual", "Schedule", "Spindle", "make_schedule",
           "TIMESTEP_SAMPLERS", "LossAwareSampler", "UniformSampler", "make_timestep_sampler"]

"""Diffusion processes and noise schedules. Pure math: imports torch only, never models/ or transformers.

Both processes have the same verbs: ``loss``, ``timesteps(spec)`` (a descending grid whose consecutive
pairs (t, s) are the reverse steps), ``step(model_output, t, s, x_t, ...)`` (never calls the network,
returns a ``StepOutput``) and ``sample`` (the loop: the network, then ``step``; returns a ``SampleOutput``).

The lists of names that the command lines offer live here once (``choices=`` reads them):
``PROCESSES``, ``PROCESS_SCHEDULES``, ``ALL_SCHEDULES``, ``SCHEDULES``/``GAUSSIAN_SCHEDULES``,
``SPINDLE_FORMS``, ``OBJECTIVES``, ``SAMPLERS`` (with ``ORDERS``, ``REMASK_SCHEDULES``; ``GAUSSIAN_SOLVERS``), ``LOSS_WEIGHTINGS``, ``LOSS_AVERAGES``, ``NEIGHBOUR_MAPS``,
``POST_TRAIN_PENALTIES`` and ``TIMESTEP_SAMPLERS`` (time conditionings: ``models.TIME_CONDITIONING``).
"""
from .absorbing import LOSS_WEIGHTINGS, AbsorbingDiffusion, LossOutput, categorical_float64, filter_logits
from .gaussian import (GAUSSIAN_SCHEDULES, GAUSSIAN_SOLVERS, LOSS_AVERAGES, NEIGHBOUR_MAPS, POST_TRAIN_PENALTIES, GaussianDiffusion,
                       GaussianLossOutput, gaussian_betas)
from . import mdlm
from .mdlm import OBJECTIVES
from .noise import BatchNoise, SampleNoise, as_noise
from .outputs import SampleOutput, StepOutput
from .samplers import ORDERS, REMASK_SCHEDULES, SAMPLERS, Sampler, make_sampler
from .respacing import ADAPTIVE_DECAY_PROPORTIONS, adaptive_decay_timesteps, parse_respacing, uniform_timesteps
from .schedules import SCHEDULES, SPINDLE_FORMS, Cosine, LogLinear, Mutual, Schedule, Spindle, make_schedule
from .timestep_samplers import TIMESTEP_SAMPLERS, LossAwareSampler, UniformSampler, make_timestep_sampler

# each process and the schedules it accepts (the first key is the default process)
PROCESS_SCHEDULES = {"absorbing": SCHEDULES, "gaussian": GAUSSIAN_SCHEDULES}
PROCESSES = tuple(PROCESS_SCHEDULES)
ALL_SCHEDULES = tuple(dict.fromkeys(name for names in PROCESS_SCHEDULES.values() for name in names))  # in order, once

__all__ = ["AbsorbingDiffusion", "mdlm", "OBJECTIVES", "LossOutput", "categorical_float64", "filter_logits", "LOSS_WEIGHTINGS", "SAMPLERS",
           "GAUSSIAN_SCHEDULES", "GAUSSIAN_SOLVERS", "LOSS_AVERAGES", "NEIGHBOUR_MAPS", "POST_TRAIN_PENALTIES", "GaussianDiffusion",
           "GaussianLossOutput", "gaussian_betas", "SampleOutput", "StepOutput", "BatchNoise", "SampleNoise", "as_noise",
           "ORDERS", "REMASK_SCHEDULES", "Sampler", "make_sampler",
           "ADAPTIVE_DECAY_PROPORTIONS", "adaptive_decay_timesteps", "parse_respacing", "uniform_timesteps",
           "SCHEDULES", "SPINDLE_FORMS", "Cosine", "LogLinear", "Mutual", "Schedule", "Spindle", "make_schedule",
           "TIMESTEP_SAMPLERS", "LossAwareSampler", "UniformSampler", "make_timestep_sampler",
           "PROCESS_SCHEDULES", "PROCESSES", "ALL_SCHEDULES"]

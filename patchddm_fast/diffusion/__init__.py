"""Diffusion (layer 3): the noise schedule, the samplers and the one train step / network evaluation.

Owns :mod:`.schedule` (linear-beta DDPM, the loss, the DDIM update), :mod:`.samplers`
(DDIM, DPM-Solver++(2M), Heun: every sampling loop) and :mod:`.steps` (``train_step`` and
``network_eval``: the only copies, run by the Trainer, the sampler, the simulator and the
profiler).  May import core, kernels, data and model; never training, sampling, analysis
or the CLI.
"""

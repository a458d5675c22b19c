"""Training (layer 4): the Trainer, its lr schedule, checkpoint files, data-parallel plumbing and cases.

Owns :mod:`.config` (``TrainConfig``: the run configuration, shared by API and CLI), :mod:`.trainer` (``Trainer(config, plan=None).fit()``: runs the execution plan it is
given, never the planner), :mod:`.schedule` (the lr schedule), :mod:`.checkpoint` (atomic,
verified checkpoint files; building the network a run describes), :mod:`.distributed`
(torchrun / DDP), :mod:`.cases` and :mod:`.sources` (where training volumes come from).
May import core, kernels, data, model, diffusion, eval and sampling; never
analysis or the CLI.
"""

"""The ``patchddm`` command line: one module per subcommand (``add_parser(subparsers)`` + ``run(args)``),
dispatched by :mod:`~patchddm_fast.cli.main`, plus :mod:`~patchddm_fast.cli.showcase` (sample, write
and draw held-out cases for ``sample`` and ``demo``).

Layer 6, the top but for the package's face: may import every layer below (core, kernels, data,
model, diffusion, eval, training, sampling, config, analysis); nothing but ``patchddm_fast.__main__``
imports it.  Commands import heavy modules inside ``run``/``add_parser`` so ``patchddm --help``
stays fast; choice lists come from the modules' own tuples.
"""

"""One module per ``patchddm`` subcommand (``add_parser`` + ``run``)."""

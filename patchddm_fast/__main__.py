"""``python -m patchddm_fast ...`` (and ``torchrun ... -m patchddm_fast train ...``): the CLI."""
import sys

from patchddm_fast.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

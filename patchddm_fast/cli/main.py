"""``patchddm`` command line: one subcommand per module in :mod:`patchddm_fast.cli`.

Each command module exposes ``add_parser(subparsers)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS = ["demo", "train", "sample", "preprocess", "predict", "evaluate", "kernels", "memory", "plan", "profile"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchddm",
        description="Memory-efficient 3D diffusion models for brain-tumour segmentation (PatchDDM).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"patchddm_fast.cli.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; the last line of defence turns every failure into one sentence.

    Exit codes: 0 success, 2 bad input or an OS error (``patchddm <command>: error: <file>:
    <reason>``), 3 training diverged (nothing non-finite saved), 130 interrupted, 1 an
    unexpected error -- its traceback goes to a crash log whose path is printed.
    """
    args = build_parser().parse_args(argv)
    prefix = f"patchddm {args.command}: error:"
    try:
        return int(args._run(args) or 0)
    except FloatingPointError as exc:  # trainer.DivergenceError
        print(f"{prefix} {str(exc).strip()}", file=sys.stderr)
        return 3
    except OSError as exc:
        print(f"{prefix} {format_os_error(exc)}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as exc:
        print(f"{prefix} {str(exc).strip()}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        print(f"{prefix} out of memory{f' ({exc})' if str(exc) else ''}; try smaller inputs or settings",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"patchddm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: keep the terminal readable, keep the traceback for the report
        log = write_crash_log(args.command, argv)
        print(f"patchddm {args.command}: internal error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
              f"the traceback is in {log} -- please attach it to a bug report", file=sys.stderr)
        return 1


def format_os_error(exc: OSError) -> str:
    """``<file>: <reason>`` (both files for a rename), or the message when no file is attached."""
    if exc.filename is None:
        return str(exc)
    reason = exc.strerror or str(exc)
    files = f"{exc.filename}" + (f" -> {exc.filename2}" if getattr(exc, "filename2", None) else "")
    return f"{files}: {reason}"


def write_crash_log(command: str, argv: Optional[List[str]]) -> str:
    """Write the current exception's traceback to ``$PATCHDDM_CRASH_DIR`` (default: the temp dir)."""
    import os
    import tempfile
    import time
    import traceback

    folder = os.environ.get("PATCHDDM_CRASH_DIR") or os.path.join(tempfile.gettempdir(), "patchddm_fast-crashes")
    text = (f"patchddm {command} crashed at {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
            f"argv: {sys.argv[:1] + list(argv if argv is not None else sys.argv[1:])}\n\n{traceback.format_exc()}")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f"patchddm-{command}-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log",
                                    dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path
    except OSError:
        sys.stderr.write(text)  # no writable crash folder: the traceback still must not be lost
        return "(not written: see the traceback above)"


if __name__ == "__main__":
    sys.exit(main())

"""Rank program for tests/test_distributed.py: run a JSON list of jobs in one process group.

Each job is ``{"train": TrainConfig dict}`` (fit it) or ``{"cli": [args]}`` (``patchddm ARGS``).
Joining the group once and running every job in it keeps the test to one launch (starting
Python and torch dominates a tiny run on a shared 2-core machine).  Start it with torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
"""
import json
import sys

from patchddm_fast.training import distributed
from patchddm_fast.cli.main import main as cli_main
from patchddm_fast.training.trainer import Trainer

if __name__ == "__main__":
    jobs = json.loads(open(sys.argv[1], encoding="utf-8").read())
    ctx, _ = distributed.init("cpu")
    for job in jobs:
        if "train" in job:
            Trainer(job["train"]).fit()
        elif cli_main([str(a) for a in job["cli"]]) != 0:
            sys.exit(f"rank {ctx.rank}: patchddm {job['cli'][0]} failed")
    distributed.shutdown(ctx)

"""One process per run folder: an exclusive ``flock`` on ``<folder>/.lock``.

Two ``train`` processes on one ``--out-dir`` used to resume each other's checkpoints and
interleave ``log.jsonl``; the final ``last.pt`` was a mix of both runs.  The lock makes the
second one stop at once with a message naming the holder (pid and host, written into the
lock file).  ``flock`` locks belong to the open file description, so the kernel releases
them when the holder exits for any reason, kill -9 included: a stale lock file never
blocks a later run (its contents are only informative).  On network file systems where
``flock`` is not enforced across machines the lock is advisory at best.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """``with RunLock(folder): ...`` -- holds the folder's lock for the block (re-entrant per object)."""

    def __init__(self, folder, what: str = "run folder"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: Optional[int] = None
        self._depth = 0

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            self._depth += 1
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise RunLockedError(f"{self.folder}: {self.what} is in use by another process ({holder}); wait for it "
                                 f"to finish or choose another folder") from None
        except BaseException:
            os.close(fd)
            raise
        info = json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), since=time.strftime("%Y-%m-%dT%H:%M:%S")))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (info + "\n").encode(), 0)
        self._fd, self._depth = fd, 1
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no stale holder info; the file itself stays (removing it would race)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it has not written its pid yet"

"""Kill a process with SIGKILL just before its Nth filesystem mutation under a directory: what a
power cut or the OOM killer does to a run at that point (tests/test_crash.py).

    killed_run.watch("runs/x", 17)   # then run train.main(...) in this process

The mutations are what Python's audit hooks see: a file opened for writing, a rename (os.replace
too), a removal, a new directory or symlink, a tree removed (and each file shutil.rmtree removes
in it). watch(dir, 0) kills nothing; the Watch it returns counts.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class Watch:
    def __init__(self, directory: Path, kill_at: int):
        self.directory, self.kill_at = os.path.realpath(directory), kill_at
        self.count = 0
        self.inside_rmtree = False  # shutil.rmtree removes by names relative to a directory descriptor

    def watched(self, path) -> bool:
        if isinstance(path, int) or path is None:
            return False
        return os.path.realpath(os.fsdecode(path)).startswith(self.directory)

    def mutation(self, event: str, args: tuple) -> bool:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITING)
            return writing and self.watched(path)
        if event == "shutil.rmtree":
            self.inside_rmtree = self.watched(args[0])
            return self.inside_rmtree
        if event in ("os.remove", "os.rmdir"):
            path, dir_fd = args
            return self.inside_rmtree if dir_fd is not None else self.watched(path)
        if event == "os.rename":
            return self.watched(args[0]) or self.watched(args[1])
        if event == "os.symlink":
            return self.watched(args[1])
        if event == "os.mkdir":
            return self.watched(args[0])
        return False

    def __call__(self, event: str, args: tuple) -> None:
        if self.mutation(event, args):
            self.count += 1
            if self.count == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)


def watch(directory: str | Path, kill_at: int) -> Watch:
    """From now on (an audit hook cannot be removed: call this in a process of its own)."""
    w = Watch(Path(directory), kill_at)
    sys.addaudithook(w)
    return w

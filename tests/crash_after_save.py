"""Runs dino-train with a fault injected; test-only, the program itself has no crash hook.

- ``CRASH_AFTER_STEP=k``: die (exit 17, no clean-up, like a kill) right after the checkpoint of
  step k is on disk.
- ``KILL_IN_SAVE_AT_STEP=k``: die (exit 17) in the middle of writing the checkpoint of step k,
  with part of it in the temporary file, as a kill during the save would.
- ``DISK_FULL_AT_STEP=k``: the write of step k's checkpoint fails with ENOSPC after some bytes,
  as on a full disk.
- ``INITIAL_CHECKPOINT=path``: also write the state before the first step (the initial weights)
  to ``path``.
"""
import errno
import io
import os
import sys
from pathlib import Path

import torch

import dino_pytorch.cli.train as train
import dino_pytorch.cli.train_checkpoint as checkpointing


def _step(name):
    value = os.environ.get(name)
    return None if value is None else int(value)


CRASH_STEP, KILL_IN_SAVE_STEP, DISK_FULL_STEP = map(_step, ("CRASH_AFTER_STEP", "KILL_IN_SAVE_AT_STEP",
                                                           "DISK_FULL_AT_STEP"))
_save, _torch_save = checkpointing.save_checkpoint, torch.save


def save_then_die(path, state):
    _save(path, state)
    if state.get("step") == CRASH_STEP:
        os._exit(17)


class FaultyFile(io.RawIOBase):
    """Passes the first 4 KiB to ``f``, then dies (``kill``) or fails with ENOSPC."""

    def __init__(self, f, kill):
        super().__init__()
        self.f, self.kill, self.written = f, kill, 0

    def writable(self):
        return True

    def write(self, data):
        if self.written + len(data) > 4096:
            if self.kill:
                self.f.flush()
                os._exit(17)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.f.write(data)


def faulty_torch_save(obj, f, *args, **kwargs):
    step = obj.get("step") if isinstance(obj, dict) else None
    if step is not None and step in (KILL_IN_SAVE_STEP, DISK_FULL_STEP):
        f = FaultyFile(f, kill=step == KILL_IN_SAVE_STEP)  # the real torch.save, on a file that fails
    return _torch_save(obj, f, *args, **kwargs)


_checkpointer_init = checkpointing.Checkpointer.__init__


def init_and_save_initial(self, *args, **kwargs):
    _checkpointer_init(self, *args, **kwargs)
    if os.environ.get("INITIAL_CHECKPOINT"):
        self.save(0, Path(os.environ["INITIAL_CHECKPOINT"]))


checkpointing.save_checkpoint = save_then_die
checkpointing.Checkpointer.__init__ = init_and_save_initial
torch.save = faulty_torch_save
sys.exit(train.main(sys.argv[1:]))

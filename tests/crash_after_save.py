"""Runs dino-train and dies (exit 17, no clean-up, like a kill) right after the checkpoint of step
``CRASH_AFTER_STEP`` is on disk. Test-only: the program itself has no crash hook."""
import os
import sys

import dino_pytorch.cli.train as train

CRASH_STEP = int(os.environ["CRASH_AFTER_STEP"])
_save = train.save_checkpoint


def save_then_die(path, state):
    _save(path, state)
    if state.get("step") == CRASH_STEP:
        os._exit(17)


train.save_checkpoint = save_then_die
sys.exit(train.main(sys.argv[1:]))

"""How a dino-train run ends early, agreed by every rank: SIGTERM / SIGINT, the time budget
(``--time_budget_min``), and saves by the clock (``--save_every_min``)."""
from __future__ import annotations

import argparse
import signal
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

# Exit status of a run stopped by a signal: the step in flight finishes, the checkpoint is written,
# and the program exits as shells report a process killed by that signal (128 + signal number).
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
# Under torchrun the ranks agree on stopping (and on saving by the clock) every this many steps,
# with one all-reduce of three ints; one process decides at every step, for free.
STOP_POLL_STEPS = 10


class RunControl:
    """When to stop early and when to checkpoint by the clock, agreed by every rank.

    SIGTERM (how clusters preempt) and SIGINT (Ctrl-C) only set a flag: the step in flight
    finishes, the checkpoint is written and the program exits with ``EXIT_CODES[signal]``. A second
    signal acts at once (the handler that was there before is put back). Under torchrun the ranks
    agree through one all-reduce every ``STOP_POLL_STEPS`` steps, so all stop at the same step.
    """

    def __init__(self, args: argparse.Namespace, world_size: int, device: torch.device) -> None:
        self.world_size, self.device = world_size, device
        self.save_every_s = 60.0 * args.save_every_min if args.save_every_min else None
        self.budget_s = None if args.time_budget_min is None else 60.0 * args.time_budget_min
        self.budget_min = args.time_budget_min
        self.start = self.last_save = time.time()
        self.signal, self.exit_code, self.stop_reason = 0, 0, ""
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. SIGINT of a background job
                    self.previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signal = max(self.signal, signum)
        signal.signal(signum, self.previous[signum])

    def poll(self, step: int) -> bool:
        """At the end of each step: True when the run stops here or a save is due by the clock."""
        if self.world_size > 1 and step % STOP_POLL_STEPS:
            return False
        now = time.time()
        flags = [self.signal, int(self.budget_s is not None and now - self.start > self.budget_s),
                 int(self.save_every_s is not None and now - self.last_save > self.save_every_s)]
        if self.world_size > 1:
            agreed = torch.tensor(flags, dtype=torch.int64, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            flags = agreed.tolist()
        sig, timed_out, save_due = flags
        if sig:
            self.exit_code = EXIT_CODES[signal.Signals(sig)]
            self.stop_reason = f"{signal.Signals(sig).name} received"
        elif timed_out:
            self.stop_reason = f"time budget of {self.budget_min} min reached"
        return bool(sig or timed_out or save_due)

    def saved(self) -> None:
        self.last_save = time.time()

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

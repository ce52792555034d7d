"""Stopping a run on Ctrl-C or SIGTERM (a scheduler's preemption) with a checkpoint instead of losing the steps.

The first signal only asks: the loop finishes the step it is in, saves a checkpoint and exits. A second
signal quits at once. With several processes they must all stop after the same step (the checkpoint is
collective), so they agree at the next log interval, where the loop already brings values to the host.
"""
import signal
import threading

import torch
from tqdm import tqdm

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    def __init__(self, accel):
        self.accel, self.asked, self.previous = accel, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
        return False

    def _handle(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        if self.accel.is_main_process:
            tqdm.write(f"train: {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                       "(send it again to quit at once, without one)")

    def should_stop(self, at_log_interval: bool) -> bool:
        """Whether every process stops after this step; one collective per log interval when several run."""
        if self.accel.num_processes == 1:
            return self.asked
        if not at_log_interval:
            return False
        flag = torch.tensor([1.0 if self.asked else 0.0], device=self.accel.device)
        return bool(self.accel.reduce(flag, "max").item())

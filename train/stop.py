"""Stopping a run on Ctrl-C or SIGTERM (a scheduler's preemption) with a checkpoint instead of losing the steps.

The first signal only asks: the loop finishes the step it is in, saves a checkpoint and exits. A second
signal quits at once. Under torchrun the workers run in their own session: the terminal's Ctrl-C reaches
torchrun, which forwards it to each worker once. With several processes they must all stop after the same
step (the checkpoint is collective), so they agree after every step through a CPU (gloo) group: one small
all-reduce between host threads, which never waits for the GPU.
"""
import signal
import threading

import torch
from tqdm import tqdm

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    def __init__(self, accel):
        self.accel, self.asked, self.previous, self.group = accel, None, {}, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        if self.accel.num_processes > 1:  # every process enters here together, as creating a group needs
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
        if self.group is not None:
            import torch.distributed as dist

            dist.destroy_process_group(self.group)
            self.group = None
        return False

    def _handle(self, signum, frame):
        if self.asked is not None:
            raise KeyboardInterrupt
        self.asked = signum
        if self.accel.is_main_process:
            tqdm.write(f"train: {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                       "(a second signal quits at once, without one)")

    def should_stop(self) -> bool:
        """Whether every process stops after this step (any one that was asked stops them all)."""
        if self.group is None:
            return self.asked is not None
        import torch.distributed as dist

        flag = torch.tensor([0 if self.asked is None else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

"""The training loop's side of the batch stream: a background thread reads and collates ahead (`Prefetch`),
and `TrainStream` is what the loop draws from and what a checkpoint stores the position of."""
from typing import Dict, Optional

import torch

from .data import BatchStream


def _thread_rchar() -> Optional[int]:
    """Bytes this thread has read through system calls (Linux's /proc/thread-self/io), or None."""
    try:
        with open("/proc/thread-self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class TrainStream:
    """This process's batches as the training loop draws them: a `BatchStream`, read ahead by `Prefetch`
    once started. As a checkpoint part its state is the position after the last batch the loop drew."""

    def __init__(self, batches: BatchStream, pin: bool = False):
        self.batches, self.pin, self.prefetch = batches, pin, None

    def start(self) -> None:
        self.prefetch = Prefetch(self.batches, pin=self.pin)

    def __call__(self) -> Dict:
        return next(self.prefetch)

    @property
    def stats(self) -> dict:
        return dict(self.prefetch.stats if self.prefetch else self.batches.stats)

    def state_dict(self) -> dict:
        return self.prefetch.state_dict() if self.prefetch else self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        assert self.prefetch is None, "a stream's position is set before it starts reading"
        self.batches.load_state_dict(state)

    def repartition(self, states) -> None:
        assert self.prefetch is None, "a stream's position is set before it starts reading"
        self.batches.repartition(states)

    def close(self) -> None:
        if self.prefetch:
            self.prefetch.close()


class Prefetch:
    """Reads and collates the next batches in a background thread, so the GPU never waits on tar
    reading; pins their memory for asynchronous copies when training on CUDA. Order is unchanged.

    `state_dict()` is the stream's position after the last batch handed out (not after those read ahead).
    """

    _END = object()

    def __init__(self, batches: BatchStream, depth: int = 4, pin: bool = False):
        import queue
        import threading

        self._q = queue.Queue(maxsize=depth)
        self._pin = pin
        self._stop = threading.Event()
        self._stateful = hasattr(batches, "state_dict")  # a BatchStream; any iterator of batches also works
        self._state = batches.state_dict() if self._stateful else None
        self.stats = batches.stats if self._stateful else {}
        self._thread = threading.Thread(target=self._fill, args=(batches,), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, batches):
        try:
            start = _thread_rchar()
            for b in batches:
                if self._pin:
                    b = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                stats = batches.stats if self._stateful else {}
                if start is not None:  # what the kernel counted this thread reading: a check on `bytes`
                    stats["rchar"] = _thread_rchar() - start
                if not self._put((b, batches.state_dict() if self._stateful else None, stats)):
                    return
        except BaseException as e:  # handed to the training loop, which raises it there
            self._put(e)
        self._put(self._END)

    def state_dict(self) -> dict:
        return self._state

    def close(self) -> None:
        """Stop the thread before the interpreter exits (a thread inside torch at exit aborts it)."""
        self._stop.set()
        self._thread.join(timeout=30)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._q.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        b, self._state, self.stats = item
        return b

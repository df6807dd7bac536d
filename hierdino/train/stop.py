"""Graceful stop: SIGTERM / SIGINT to the driver ends the run at a step boundary with a checkpoint.

The driver owns a small actor (``StopFlag``); its signal handler asks the actor to stop. Every
training worker polls the actor without blocking (``StopPoller``: one outstanding call, checked with
``ray.wait(timeout=0)`` at each step) and so learns of the request, each rank at its own step. One
worker stops after the step it learns it at. Several must stop after the same step (FSDP collectives
pair up step by step), so each rank votes in the step's all-reduce of its loss terms
(``hierdino.train.loop.TrainStep``) and all stop after the next log or checkpoint step, where every
rank reads the same votes back. The loop then checkpoints that step and returns; the driver says how
to resume. Kubernetes sends SIGTERM to an evicted pod, then SIGKILL after its grace period: with
several workers the stop waits for up to 2 x ``train.log_every`` steps.
"""

from __future__ import annotations

import logging
import signal

import ray

logger = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class StopFlag:
    def __init__(self):
        self.requested = False

    def request(self) -> None:
        self.requested = True

    def poll(self) -> bool:
        """Whether a stop has been requested."""
        return self.requested


class StopPoller:
    """A worker's view of the ``StopFlag``: ``asked()`` never blocks, and stays true once true."""

    def __init__(self, flag):
        self.flag, self.pending, self.known = flag, None, False

    def asked(self) -> bool:
        if self.flag is None or self.known:
            return self.known
        if self.pending is not None:
            ready, _ = ray.wait([self.pending], timeout=0)
            if not ready:
                return False
            self.known, self.pending = ray.get(self.pending), None
            if self.known:
                return True
        self.pending = self.flag.poll.remote()
        return False


class GracefulStop:
    """Driver side: ``with GracefulStop() as stop:`` installs SIGTERM/SIGINT handlers that
    request a stop once (a second signal aborts as before); ``stop.flag`` goes to the workers."""

    def __init__(self):
        self.flag = StopFlag.remote()
        self.signal, self.previous = None, {}

    def _handler(self, signum, frame):
        if self.signal is not None:  # a second signal: give up on the graceful stop
            signal.signal(signum, self.previous.get(signum) or signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        self.flag.request.remote()
        logger.info(f"{self.signal}: finishing the step in flight and writing a checkpoint "
                    "(send it again to abort without one)")

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self.previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)
        ray.kill(self.flag)  # one flag per run: none left behind in a long-lived cluster
        return False

"""Stop signals for a training loop: Ctrl-C, SIGTERM and SIGUSR1 end a run cleanly, on every rank together.

SIGTERM is what SLURM (at the time limit), Kubernetes and spot-instance reclaims send; SIGUSR1 is SLURM's
usual advance warning (``#SBATCH --signal=USR1@90``). A trainer wants the same from all three: finish the
step in flight, save it, release the run directory and exit, with a status that tells a scheduler to run the
job again ([`PREEMPTED_EXIT`][picomaml.train.preemption.PREEMPTED_EXIT], except for Ctrl-C).

[`StopSignals`][picomaml.train.preemption.StopSignals] installs handlers for the three signals. Before the
loop starts (setup: reading data, restoring a checkpoint) a signal raises
[`Preempted`][picomaml.train.preemption.Preempted], which unwinds the setup so that the run directory's lock
is released. From [`enter_loop`][picomaml.train.preemption.StopSignals.enter_loop] on, a signal only sets a
flag; the loop reads it at its sync points (an all-reduce of [`code`][picomaml.train.preemption.StopSignals.code]
over the ranks, so every rank stops after the same step) and never cuts a step, a save or the exit. An
evaluation can end early: its ``progress`` callback is
[`raise_if_stopped`][picomaml.train.preemption.StopSignals.raise_if_stopped].
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["PREEMPTED_EXIT", "STOP_SIGNALS", "Preempted", "StopRequested", "StopSignals"]

#: exit status of a run stopped by SIGTERM or SIGUSR1 after saving: EX_TEMPFAIL ("try again"); requeue it
#: with ``--resume auto``
PREEMPTED_EXIT = 75
#: the signals that stop a run (those this platform has)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))
_CODES = {"SIGINT": 1}  # every other stop signal is a preemption: code 2, which wins the max over ranks
_NAMES = {1: "SIGINT", 2: "SIGTERM/SIGUSR1"}


class Preempted(BaseException):
    """A stop signal arrived before the training loop began (nothing trained yet).

    A ``BaseException``, like ``KeyboardInterrupt``: code that catches ``Exception`` lets it pass, and
    ``with`` blocks (the run directory's lock) unwind.

    Attributes:
        signal_name: ``"SIGTERM"``, ...
    """

    def __init__(self, signal_name: str) -> None:
        self.signal_name = signal_name
        super().__init__(f"stopped by {signal_name} before training began")

    @property
    def exit_status(self) -> int:
        """130 for Ctrl-C (the shell's convention), else [`PREEMPTED_EXIT`][picomaml.train.preemption.PREEMPTED_EXIT]."""
        return 130 if self.signal_name == "SIGINT" else PREEMPTED_EXIT


class StopRequested(Exception):
    """Raised by [`StopSignals.raise_if_stopped`][picomaml.train.preemption.StopSignals.raise_if_stopped]
    to end long work (an evaluation) early."""


class StopSignals:
    """Handlers for SIGINT, SIGTERM and SIGUSR1 while in use as a context manager (restored on exit).

    Handlers run only in the main thread; elsewhere (a trainer started from a thread) nothing is
    installed and [`received`][picomaml.train.preemption.StopSignals.received] stays ``None``.

    Examples:
        ```python
        with StopSignals() as stop:
            setup()            # a signal here raises Preempted: the setup unwinds
            stop.enter_loop()
            while not stop.received:
                train_step()   # a signal here only sets stop.received
        ```
    """

    def __init__(self) -> None:
        self.received: str | None = None  # the first stop signal's name
        self.count = 0  # signals received, the first included
        self.in_loop = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def enter_loop(self) -> None:
        """From now on a signal only sets the flag (a signal already received is kept)."""
        self.in_loop = True

    @property
    def code(self) -> int:
        """0: no signal; 1: Ctrl-C; 2: a preemption (SIGTERM, SIGUSR1). The max over ranks is the run's."""
        return 0 if self.received is None else _CODES.get(self.received, 2)

    @staticmethod
    def name_of(code: int) -> str:
        """The signal a [`code`][picomaml.train.preemption.StopSignals.code] stands for (another rank's)."""
        return _NAMES.get(code, "a stop signal")

    def raise_if_stopped(self, *_: object) -> None:
        """Raise [`StopRequested`][picomaml.train.preemption.StopRequested] once a signal came in; usable as
        a ``progress`` callback."""
        if self.received is not None:
            raise StopRequested(self.received)

    def _handle(self, signum: int, frame: FrameType | None) -> None:  # no I/O here: a write may be in flight
        self.count += 1
        if self.received is None:
            self.received = signal.Signals(signum).name
        if not self.in_loop:
            raise Preempted(self.received)

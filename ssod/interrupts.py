"""Stop requests: SIGTERM and Ctrl-C become a flag the training loop reads each step."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Optional

log = logging.getLogger(__name__)


class Interrupts:
    """SIGTERM / SIGINT set a flag the loop checks each step (checkpoint, then KILLED).

    The first is acknowledged on the console at once; an evaluation under way is cut short
    (one process) or announced as the wait (several: they must finish it together). A second
    Ctrl-C raises KeyboardInterrupt at once; ``safe_to_save`` says whether the model is then
    in a consistent state (between steps, e.g. evaluating), so the run can still checkpoint.
    """

    def __init__(self) -> None:
        self.requested = False
        self.safe_to_save = False
        self.evaluating = False
        self._signum: Optional[int] = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self._signum = self._signum or signum
        where = "the evaluation" if self.evaluating else "this step"
        log.warning("%s received: stopping after %s with a checkpoint; Ctrl-C again stops at once",
                    signal.Signals(signum).name, where)

    @property
    def signum(self) -> Optional[int]:
        """The first stop signal received (SIGTERM or SIGINT), if any."""
        return self._signum

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def pass_on(self) -> None:
        """Hand a stop request the run did not act on (it came after the last step's check)
        to the handler that was there before, if it is one of ours (not Python's default
        Ctrl-C handler): a tuning worker running trials in this process must still stop
        after this trial."""
        previous = self._previous.get(self._signum) if self.requested else None
        # Python's own Ctrl-C handler would raise KeyboardInterrupt over a finished run.
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self._signum, None)

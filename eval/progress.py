"""Progress of an ``eval run`` rank where stderr is not a terminal (a log file, a Slurm output, a pipe): a tqdm bar
there writes carriage returns a log never shows until the run ends, so instead one line every
:data:`EVERY_S` seconds - from a timer thread, so a batch that takes minutes still shows the run is alive:

    [rank 0] INFO eval: pope rank 0/1: 120 of 500 answered (24%), 1m 05s elapsed, 1.85 questions/s, about 3m 26s left

On a terminal the tqdm bar stays (:func:`progress` picks)."""

from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger("eval")

#: seconds between two progress lines off a terminal (at least every 10 s)
EVERY_S = 10.0


def _dur(s: float) -> str:
    s = int(round(s))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h {m:02d}m" if h else (f"{m}m {sec:02d}s" if m else f"{sec}s")


class LineProgress:
    """``update(n)`` as batches end; a line every ``every`` seconds (and one at the end) until :meth:`close`."""

    def __init__(self, total: int, desc: str, every: float | None = None):
        self.total, self.desc, self.done = total, desc, 0
        self.every = EVERY_S if every is None else every
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name="eval-progress", daemon=True)
        self._thread.start()

    def line(self) -> str:
        with self._lock:
            done, el = self.done, time.monotonic() - self.t0
        pct = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        left = f", about {_dur(el / done * (self.total - done))} left" if 0 < done < self.total else ""
        rate = f", {done / el:.2f} questions/s" if done and el > 0 else ""
        return f"{self.desc}: {done} of {self.total} answered{pct}, {_dur(el)} elapsed{rate}{left}"

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            log.info("%s", self.line())

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n

    def close(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            log.info("%s", self.line())


class _Bar:
    """The tqdm bar behind the same two calls."""

    def __init__(self, bar):
        self.bar = bar

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def progress(total: int, desc: str, stream=None):
    """A tqdm bar on a terminal, else a :class:`LineProgress`; both have ``update(n)`` and ``close()``."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        from tqdm import tqdm

        return _Bar(tqdm(total=total, desc=desc, mininterval=5, dynamic_ncols=True, unit="q"))  # its rate: questions/s
    return LineProgress(total, desc)

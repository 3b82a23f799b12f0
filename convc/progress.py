"""A progress line on stderr for work that takes more than a second
(compiles, tunes): one line, rewritten in place, cleared when the work ends.

It shows only when stderr is a terminal, and never with ``quiet=True``;
``CONVC_PROGRESS=1`` shows it when stderr is not a terminal too (a file or
a pipe, for tests), ``CONVC_PROGRESS=0`` never. A background thread redraws the line a few times
a second, so a long step (the C compiler) still shows its elapsed time."""
from __future__ import annotations

import os
import sys
import threading
import time

DELAY = 1.0
"""Seconds of work before the line first shows: shorter work shows nothing."""
REDRAW = 0.25
"""Seconds between redraws of the elapsed time."""


def wanted(quiet: bool = False, stream=None) -> bool:
    """Whether a progress line is shown: never when ``quiet``; else as
    ``CONVC_PROGRESS`` says if set ("1" on, "0" off), else when ``stream``
    (stderr) is a terminal."""
    if quiet:
        return False
    env = os.environ.get("CONVC_PROGRESS", "").strip()
    if env:
        return env not in ("0", "off", "no", "false")
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_active: list = []
"""The progress lines showing now (at most one: a line inside another's work stays off)."""


class Progress:
    """``with Progress("compile 'vgg11'") as p: p.update("passes") ...``:
    after :data:`DELAY` seconds, ``[convc] compile 'vgg11': passes (2.1 s)``
    on stderr, rewritten at every :meth:`update` and every :data:`REDRAW`
    seconds; cleared at the end. Disabled (every method a no-op) when
    :func:`wanted` says so."""

    def __init__(self, what: str, quiet: bool = False, stream=None):
        self.what = what
        self.stream = sys.stderr if stream is None else stream
        self.enabled = wanted(quiet, self.stream) and not _active      # a compile inside a tune: the tune's line

        self.step = ""
        self._shown = 0                     # width of the line on screen
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Progress":
        self.t0 = time.perf_counter()
        if self.enabled:
            _active.append(self)
            self._thread = threading.Thread(target=self._loop, name="convc-progress", daemon=True)
            self._thread.start()
        return self

    def update(self, step: str) -> None:
        """The step now running (redrawn at once if the line shows)."""
        self.step = step
        if self.enabled and time.perf_counter() - self.t0 >= DELAY:
            self._draw()

    def say(self, text: str) -> None:
        """Print ``text`` as a line of its own on the stream (clearing the
        progress line first; it comes back at the next redraw)."""
        with self._lock:
            if self._shown:
                self._write("\r" + " " * self._shown + "\r")
                self._shown = 0
            self._write(text + "\n")

    def _loop(self) -> None:
        if self._stop.wait(DELAY):
            return
        while True:
            self._draw()
            if self._stop.wait(REDRAW):
                return

    def _draw(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            line = f"[convc] {self.what}: {self.step} ({time.perf_counter() - self.t0:.1f} s)"
            pad = max(0, self._shown - len(line))
            self._write("\r" + line + " " * pad)
            self._shown = len(line)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):       # a closed stream: drop the line, never fail the work
            self.enabled = False

    def __exit__(self, *exc) -> None:
        if self in _active:
            _active.remove(self)
        if self._thread is not None:
            with self._lock:
                self._stop.set()
            self._thread.join()
            if self._shown:
                self._write("\r" + " " * self._shown + "\r")
                self._shown = 0

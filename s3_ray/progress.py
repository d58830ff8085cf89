"""Progress of a long step, the one display for the whole CLI: a live tqdm bar on a terminal, plain
lines elsewhere (Ray job logs, CI, a redirected stream).

Plain lines carry no control codes (no ``\\r``, no ANSI escapes) and come at a bounded rate: one at
the start, then at most one every ``interval`` seconds (``$S3_PROGRESS_INTERVAL``, default 10), and
one at the end. Progress goes to stderr by default, so ``s3 ... > file`` keeps a clean table.

    with Progress(100, "search", unit="trials", per="min") as p:
        p.update(status="best fid 3.2")
"""

from __future__ import annotations

import os
import sys
from time import monotonic

from tqdm import tqdm

DEFAULT_INTERVAL_S = 10.0
LIVE_REFRESH_S = 1.0  # a live bar redraws at least this often while ticked (elapsed, ETA)


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("S3_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def _clock(seconds: float) -> str:
    return tqdm.format_interval(max(0, int(seconds)))


class Progress:
    """``n`` of ``total`` units done, a status text, the rate (per second or ``per="min"``) and the ETA.

    ``initial`` units were done before (a resumed run); the rate and ETA count only this run's.
    ``tick()`` (call it while waiting) keeps a live bar's clock moving and plain lines coming."""

    def __init__(self, total: int, desc: str, unit: str = "", *, initial: int = 0, status: str = "",
                 per: str = "s", stream=None, interval: float | None = None, live: bool | None = None):
        self.total, self.desc, self.unit, self.per = max(int(total), 0), desc, unit, per
        self.n = self.initial = int(initial)
        self.status = status
        self.stream = stream if stream is not None else sys.stderr
        self.interval = _interval() if interval is None else interval
        self.live = _isatty(self.stream) if live is None else live
        self.started = self._last = monotonic()
        self.closed = False
        self._bar = None
        self._printed = None  # (n, status) of the last plain line
        if self.live:
            sized = _sized(self.stream)  # else a fixed 80x24: tqdm draws nothing on a 0x0 terminal
            self._bar = _Bar(total=self.total, initial=self.n, desc=desc, file=self.stream, dynamic_ncols=sized,
                             ncols=None if sized else 80, nrows=None if sized else 24,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {text}", leave=True, text=self.text())
        else:
            self._line()

    # ---- what is shown ---------------------------------------------------------------------------
    def text(self) -> str:
        """The progress without the bar, the status last (a narrow terminal cuts the end off):
        ``12/100 trials | 14.2 trials/min | 00:51 elapsed, ETA 06:12 | status``."""
        unit = f" {self.unit}" if self.unit else ""
        parts = [f"{self.n}/{self.total}{unit}"]
        elapsed = monotonic() - self.started
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        if done:
            scale = 60.0 if self.per == "min" else 1.0
            parts.append(f"{rate * scale:.1f} {self.unit or 'it'}/{self.per}")
        left = max(self.total - self.n, 0)
        eta = "-" if self.closed or not left else (_clock(left / rate) if rate > 0 else "?")
        parts.append(f"{_clock(elapsed)} elapsed, ETA {eta}")
        if self.status:
            parts.append(self.status)
        return " | ".join(parts)

    def line(self) -> str:
        """One plain line: ``search: 12/100 trials (12%) | ...``."""
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""
        head, _, rest = self.text().partition(" | ")
        return f"{self.desc}: {head}{pct}" + (f" | {rest}" if rest else "")

    # ---- updates ---------------------------------------------------------------------------------
    def update(self, n: int = 1, status: str | None = None) -> None:
        """``n`` more units done (0: only a new status); nothing once closed."""
        if self.closed:
            return
        self.n += n
        if status is not None:
            self.status = status
        if self._bar is not None:
            self._bar.text = self.text()
            self._bar.update(n)  # redraws at most every tqdm's mininterval
            if n == 0:
                self._bar.refresh()
            self._last = monotonic()
        else:
            self.tick()

    def set_total(self, total: int) -> None:
        self.total = max(int(total), 0)
        if self._bar is not None:
            self._bar.total = self.total

    def tick(self) -> None:
        """Redraw a live bar at least every second; write a plain line if ``interval`` has passed."""
        if self.closed:
            return
        now = monotonic()
        if self._bar is not None:
            if now - self._last >= LIVE_REFRESH_S:
                self._bar.text = self.text()
                self._bar.refresh()
                self._last = now
        elif now - self._last >= self.interval:
            self._line()

    def close(self) -> None:
        """The final state: the bar stays on screen, or one last plain line."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.text = self.text()
            self._bar.close()
        elif self._printed != (self.n, self.status):  # unless the last line said the same
            self._line()

    def _line(self) -> None:
        self._last, self._printed = monotonic(), (self.n, self.status)
        try:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not stop the work
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Bar(tqdm):
    """A tqdm bar that shows ``text`` (our own counts, rate and ETA) after the bar."""

    def __init__(self, *args, text: str = "", **kwargs):
        self.text = text
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self):
        return {**super().format_dict, "text": self.text}


def _sized(stream) -> bool:
    """Does the terminal report its size? A pseudo-terminal nobody sized (e.g. under `script` without
    a terminal) reports 0x0, and tqdm then draws nothing (it fits its bars into 0 rows)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):  # no file descriptor: tqdm sizes it as before
        return True
    return size.columns > 0 and size.lines > 0


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False

"""Training progress that suits where it runs: a tqdm bar in a terminal, a few whole lines in a log.

In a terminal, tqdm redraws one line per step with both loss terms, it/s and the ETA. Written to a file
or a CI log, those redraws are a carriage-return update per step (hundreds of lines in `db-adapt demo >
log`), so `LineProgress` writes one compact line every ~5% of the run instead.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

LINES_PER_RUN = 20  # one line every 5% of the steps


def progress_bar(total: int, *, enabled: bool, description: str = "personalize", stream: IO[str] | None = None) -> Any:
    """A tqdm bar when `stream` (stderr) is a terminal, else a `LineProgress`; both take update/set_postfix/close.

    Args:
        total (`int`): the number of steps.
        enabled (`bool`): False shows nothing at all.
        description (`str`): what runs, the first word of each line.
        stream (`IO[str] | None`): where progress goes; None: stderr, as tqdm writes.

    Example:
        >>> import io
        >>> log = io.StringIO()
        >>> bar = progress_bar(40, enabled=True, stream=log)
        >>> for _ in range(40):
        ...     bar.update(1)
        >>> bar.close()
        >>> len(log.getvalue().splitlines())
        20
    """
    from tqdm.auto import tqdm

    stream = stream if stream is not None else sys.stderr
    if not enabled:
        return tqdm(total=total, disable=True)
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, desc=description, dynamic_ncols=True, file=stream)
    return LineProgress(total, description, stream)


class LineProgress:
    """Progress as whole lines, one every `total / LINES_PER_RUN` steps and one at the end.

    Args:
        total (`int`): the number of steps.
        description (`str`): the first word of each line.
        stream (`IO[str]`): where lines go.
    """

    def __init__(self, total: int, description: str, stream: IO[str]) -> None:
        self.total, self.description, self.stream = total, description, stream
        self.every = max(1, -(-total // LINES_PER_RUN))
        self.done, self.started, self.first_done = 0, time.perf_counter(), 0
        self.postfix: dict[str, Any] = {}

    def update(self, count: int = 1) -> None:
        if self.done == 0 and count > 1:  # a resumed run jumps to its checkpoint: rates count from there
            self.first_done = count
        self.done += count
        if self.done == self.total or (self.done > self.first_done and self.done % self.every == 0):
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def set_postfix(self, values: dict[str, Any]) -> None:
        self.postfix = dict(values)

    def line(self) -> str:
        """E.g. `personalize 60/300 (20%) loss=0.1234 instance=0.1000 3.1 it/s ETA 1m17s`."""
        elapsed = time.perf_counter() - self.started
        rate = (self.done - self.first_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        terms = " ".join(f"{key}={value}" for key, value in self.postfix.items())
        percent = 100 * self.done // max(self.total, 1)
        return (
            f"{self.description} {self.done}/{self.total} ({percent}%) {terms} {rate:.1f} it/s "
            f"ETA {int(eta // 60)}m{int(eta % 60):02d}s"
        ).replace("  ", " ")

    def close(self) -> None:
        """Nothing to tidy up: every line is already written."""

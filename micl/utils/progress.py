"""Progress bars (tqdm) and the error line that may follow one.

A bar redraws its line with carriage returns and no newline; closed with `leave=False` it is blanked, which
a terminal shows as an empty line but a log or a pipe keeps as text. `end_bars(stream)` is what the CLI calls
before printing an error, so that the error starts a line of its own: it closes the bars still drawn (a
Trainer's, interrupted by the error) and, on a stream that is not a terminal, ends the line a bar left.
"""

from __future__ import annotations

import sys

_drawn = False  # a bar of `progress_bar` was shown since the command started (`start_command`)


def start_command() -> None:
    """Forgets the bars of an earlier command of this process (`micl.cli.main` called again, as in tests)."""
    global _drawn
    _drawn = False


def progress_bar(**kwargs):
    """A tqdm.auto bar (same arguments)."""
    global _drawn
    from tqdm.auto import tqdm

    bar = tqdm(**kwargs)
    _drawn = _drawn or not bar.disable
    return bar


def end_bars(stream) -> None:
    std = sys.modules.get("tqdm.std")  # no tqdm imported: no bar was drawn
    live = [bar for bar in getattr(getattr(std, "tqdm", None), "_instances", ()) if not bar.disable]
    for bar in sorted(live, key=lambda b: abs(getattr(b, "pos", 0) or 0), reverse=True):
        bar.close()
    isatty = getattr(stream, "isatty", None)
    if (live or _drawn) and not (isatty and isatty()):
        stream.write("\n")

"""What the command lines (`amfor-train`, `amfor-test`, `amfor-export`, `amfor-extract`, ...) share: their name as
invoked, and one line on stderr with exit code 2, no traceback, for the errors a user can fix (a bad config, a
missing or unreadable dataset, image, weights file or checkpoint, a missing optional package)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .config import ConfigError
from .engine.build import SetupError
from .engine.checkpoint import CheckpointError
from .extras import MissingExtraError

USER_ERRORS = (ConfigError, CheckpointError, SetupError, MissingExtraError, OSError)
BAD_IMAGE_HINT = "data.kwargs.on_bad_image=skip drops unreadable images when the dataset is built"


def prog_name(module: str) -> str:
    """`amfor-train` when run as the console command, else `python -m amfor.train`."""
    invoked = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return invoked if invoked.startswith("amfor-") else f"python -m {module}"


def one_line(exc: BaseException) -> str:
    """The exception's message on one line. An error re-raised from a DataLoader worker carries the worker's
    traceback in its text: its last line is the worker's own message."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "Original Traceback" in text:
        return re.sub(r"^[\w.]+: ", "", lines[-1])
    return " ".join(lines)


def report(prog: str, exc: BaseException, hint: str | None = BAD_IMAGE_HINT) -> int:
    """Print `<prog>: error: <message>` to stderr and return the exit code 2. An unreadable image's message gets
    `hint` (by default how a dataset skips such images; None for a command that has no dataset)."""
    message = one_line(exc)
    if hint and ("cannot read image" in message or "unreadable image" in message):
        message = f"{message} ({hint})"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2

"""A filter for a training launch's stderr (used by scripts/sweep_lib.sh): everything passes through as it comes
(progress bars included: pieces end at "\\r" as well as "\\n") until the trainer prints its own `error: ` lines.
What the launcher adds after them (accelerate's CalledProcessError traceback, torchrun's ChildFailedError summary)
is dropped, so a refused flag or a stopped run reads as the trainer's one-line errors only. The same error line
from several processes is shown once. A library's Python warning (`path.py:N: SomeWarning: ...` and its indented
source line) waits for the next line: before an error it goes after the errors, so a third-party note never heads a
failed launch.

    { accelerate launch ... 2>&1 1>&3 3>&- | python scripts/launch_errors_only.py >&2 3>&-; } 3>&1
"""

import os
import re
import sys


ERROR = b"error: "
WARNING = re.compile(rb"^\S[^:]*\.py:\d+: \w*Warning: ")


def filter_stream(read, write):
    """Copy `read()` chunks to `write(piece)` with the rule above; returns whether an error line came."""
    seen, pending, errors, held = False, b"", set(), []

    def emit(piece):
        nonlocal seen
        line = piece.lstrip(b"\r")
        if line.startswith(ERROR):
            seen = True
            if line not in errors:
                errors.add(line)
                write(piece)
        elif seen:
            return
        elif WARNING.match(line) or (held and line.startswith(b"  ")):
            held.append(piece)
        else:
            while held:
                write(held.pop(0))
            write(piece)

    while chunk := read():
        pending += chunk
        while True:
            ends = [index for index in (pending.find(b"\n"), pending.find(b"\r", 1)) if index >= 0]
            if not ends:
                break
            cut = min(ends) + 1
            emit(pending[:cut])
            pending = pending[cut:]
        # A piece still open (a progress bar's latest update) goes out now, unless it may begin an error line.
        if pending and not seen and not ERROR.startswith(pending.lstrip(b"\r")[: len(ERROR)]):
            while held:
                write(held.pop(0))
            write(pending)
            pending = b""
    if pending:
        emit(pending)
    for piece in held:  # after the errors, or last
        write(piece)
    return seen


def main():
    out = sys.stdout.buffer

    def write(piece):
        out.write(piece)
        out.flush()

    filter_stream(lambda: os.read(0, 1 << 16), write)


if __name__ == "__main__":
    main()

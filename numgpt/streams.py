"""Standard streams that cannot end a run: closed at start (`>&-`, `2>&-`), or failing later (the
reader of a pipe left, as with `| head -1`; a full disk; a terminal that went away).

fill_closed_fds() opens os.devnull on any of the descriptors 0, 1, 2 that is closed, so that no
file the program opens later (a checkpoint, a lock) lands on descriptor 1 or 2 and receives text
meant for the terminal. guard() replaces sys.stdout / sys.stderr by a Guarded stream that, on a
write error, points the descriptor at os.devnull and carries on, so the run goes to its end.
"""
import errno
import io
import os
import sys


def fill_closed_fds():
    """Open os.devnull on each of the descriptors 0, 1, 2 that is closed; return those."""
    filled = set()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            filled.add(fd)
    return filled


def discard(stream):
    """Point the descriptor under stream at os.devnull, so text still buffered in it (and anything
    written later) is dropped instead of raising again, e.g. when Python flushes it at exit."""
    try:
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except (AttributeError, OSError, ValueError):
        pass


class Guarded(io.TextIOBase):
    """A text stream that forwards to another and, when a write or flush fails (EPIPE, ENOSPC,
    EIO, ...), discards the stream for good instead of raising. The first such error is kept in
    .error; on_error(name, error) is called once with it (e.g. to say so on the other stream)."""

    def __init__(self, stream, name, on_error=None):
        super().__init__()
        self._stream = stream
        self.name = name
        self.error = None
        self._on_error = on_error

    def _failed(self, e):
        if self.error is None:
            self.error = e
            discard(self._stream)
            try:  # drop what the failed write left in the buffer (it now goes to os.devnull)
                self._stream.flush()
            except (OSError, ValueError):
                pass
            if self._on_error is not None:
                self._on_error(self.name, e)

    def write(self, s):
        if self.error is None:
            try:
                self._stream.write(s)
            except OSError as e:
                self._failed(e)
        return len(s)

    def flush(self):
        if self.error is None:
            try:
                self._stream.flush()
            except OSError as e:
                self._failed(e)

    def writable(self):
        return True

    def isatty(self):
        try:
            return self.error is None and self._stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self):
        return self._stream.fileno()

    @property
    def encoding(self):
        return getattr(self._stream, "encoding", "utf-8")

    @property
    def errors(self):
        return getattr(self._stream, "errors", "strict")


def is_closed(stream):
    """True when stream is None (Python found its descriptor closed at start) or has no open
    descriptor under it."""
    if stream is None:
        return True
    try:
        os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return True
    return False


def open_devnull_text():
    """A text stream writing to os.devnull (stands in for a stream that was closed at start)."""
    return open(os.devnull, "w", encoding="utf-8")


def warn_lost(name, e):
    """Say once, on stderr, that the output stream `name` failed and its text is dropped from now
    on; quiet when the reader of a pipe left (the user chose that, e.g. with `| head`)."""
    if e.errno == errno.EPIPE:
        return
    other = sys.stderr if name == "stdout" else None
    if other is not None:
        print(f"warning: cannot write the output ({name}): {e.strerror or e}; the run goes on and "
              "its output is discarded", file=other, flush=True)

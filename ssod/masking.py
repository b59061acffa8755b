"""Passwords out of everything ssod prints or logs: ``scheme://user:password@host`` becomes
``scheme://user:***@host`` in log lines, MLflow params and tags, and on the console."""

from __future__ import annotations

import re
import sys

_URI_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@\s]+)@")


def mask_secrets(text: str) -> str:
    """Replace the password of every ``scheme://user:password@host`` in ``text`` by ``***``.

    A password may hold ``/`` (SQLAlchemy accepts it; base64 ones often do), so it runs
    to the ``@``: a URL with ``host:port/...@`` in its path is masked too (safe side).
    """
    return _URI_PASSWORD.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:***@", text)


class MaskedStream:
    """A text stream that masks URL passwords (``mask_secrets``) in everything written to it.

    The console entry points put ``sys.stdout`` and ``sys.stderr`` behind one: ssod prints its
    MLflow links (MLflow's own "View run ... at" lines are off, see ``quiet_mlflow_links``), Hydra prints the overrides of a failed job and Python
    the traceback of an error, each of which may carry ``user:password@`` in a URI.
    """

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(mask_secrets(text))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def mask_console() -> None:
    """Put ``sys.stdout`` / ``sys.stderr`` behind ``MaskedStream`` (once; for console entry points)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, MaskedStream):
            setattr(sys, name, MaskedStream(stream))

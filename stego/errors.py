"""The one exception type a user of stego should ever see."""

from __future__ import annotations


class StegoError(Exception):
    """A problem with the user's input, files or settings.

    The message must name the offending file, value or key and say how to fix it. The command
    line prints it on one line and exits with status 2 instead of showing a traceback.
    """

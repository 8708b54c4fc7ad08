"""The project's error types.

Every problem a user can fix (a bad path, a corrupt file, a nonsense budget) is raised as
:class:`LoraCompressError` with a one-line message that says what is wrong and how to fix it.
The CLI turns it into exit code 2 without a traceback. Anything else escaping is a bug.
"""

from __future__ import annotations


class LoraCompressError(Exception):
    """A user-fixable problem. ``str(err)`` is the one-line message shown to the user."""

    exit_code = 2


class CheckFailed(Exception):
    """``loracompress check`` found a breach: exit code 1, not a user error."""

    exit_code = 1


def brief(err: BaseException | str, limit: int = 160) -> str:
    """The first line of ``err``'s message, at most ``limit`` characters, cut between words (with "…"),
    for quoting a library's error inside one of ours: a cut mid-word ("You can inspec") reads as a typo."""
    text = str(err).strip()
    line = text.splitlines()[0].strip() if text else type(err).__name__
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:.")
    return (cut or line[:limit]) + "…"

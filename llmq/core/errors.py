"""One exception type for every problem the user can fix.

The CLI prints these as a single line (`llmq: error: ...`) and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class LlmqError(Exception):
    """A user-facing error: the message names the problem and the fix, on one line."""


def reason(error: BaseException) -> str:
    """A third-party exception as a few words for a one-line message: its type and the start of its text."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__

"""One exception type for every problem the user can fix.

The CLI prints these as a single line (`llmq: error: ...`) and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class LlmqError(Exception):
    """A user-facing error: the message names the problem and the fix, on one line."""

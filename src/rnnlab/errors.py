"""The exception type for errors a user can cause (bad paths, bad files, bad values, corrupt checkpoints).

The CLI prints its message as one line on stderr and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class RnnlabError(Exception):
    """A user-facing error: the message alone tells what went wrong and how to fix it."""


class Diverged(RnnlabError):
    """Training stopped being finite, or its loss jumped far above its running level."""

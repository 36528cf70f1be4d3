"""Errors a user can cause and fix. The CLIs print them as one sentence, no traceback.

Each message names the cause (the file, key or value) and the fix.
"""

import re

# torch's DataLoader re-raises a worker's exception as `type(err)(text)`, where the text is
# "Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...\n<module.Class>: <message>".
_WORKER_TEXT = re.compile(
    r"\ACaught \w+ in DataLoader worker process \d+\.\nOriginal Traceback.*\n[\w.]+: ([^\n]+)\n?\Z", re.DOTALL
)


class UserError(Exception):
    """Base class: a problem with the user's input, not a bug in frcnn_train."""

    def __init__(self, *args: object) -> None:
        # Raised in a DataLoader worker, the sentence would arrive wrapped in the worker's traceback.
        if len(args) == 1 and isinstance(args[0], str) and (found := _WORKER_TEXT.match(args[0])):
            args = (found.group(1),)
        super().__init__(*args)


class ConfigError(UserError):
    """A config value that cannot work (unknown name, conflicting keys, changed on resume)."""


class DataError(UserError):
    """A dataset file or directory that is missing or malformed."""


class CheckpointError(UserError):
    """A checkpoint or weights file that is missing, damaged or incompatible."""


class RunDirError(UserError):
    """A run directory this run may not write: another run's, read-only, or in use by another process."""


class ExportError(UserError):
    """A model that the chosen export format cannot represent (frcnn-export)."""

"""Errors a user can cause and fix. The CLIs print them as one sentence, no traceback.

Each message names the cause (the file, key or value) and the fix.
"""


class UserError(Exception):
    """Base class: a problem with the user's input, not a bug in frcnn_train."""


class ConfigError(UserError):
    """A config value that cannot work (unknown name, conflicting keys, changed on resume)."""


class DataError(UserError):
    """A dataset file or directory that is missing or malformed."""


class CheckpointError(UserError):
    """A checkpoint or weights file that is missing, damaged or incompatible."""


class RunDirError(UserError):
    """A run directory this run may not write: another run's, read-only, or in use by another process."""

"""The toolkit's own exceptions.

Every error a user can cause with bad input is a ``KeyeInputError`` (a ``ValueError``), whose
message names the input and what is wrong with it. The CLI prints these as one line and exits
non-zero; anything else is a bug and keeps its traceback.
"""


class KeyeInputError(ValueError):
    """Bad user input: a message, a file, a config value. The message names the input."""


class VideoError(KeyeInputError):
    """A video or image that cannot be read, or video options that cannot be satisfied."""


class ConfigError(KeyeInputError):
    """A config file or override that is unknown, mistyped or out of range."""


class RunInterrupted(Exception):
    """A training run stopped on request (Ctrl-C) after a step, with a checkpoint of that step written.
    The message says where it stopped; rerunning the same command resumes it."""

"""Errors meant for people: each names the file, key or sample at fault and what was expected.

The command-line entry points catch :class:`VitasksError` and print its message without a
traceback; anything else is a bug and keeps its traceback.
"""


class VitasksError(Exception):
    """Base class of every user-facing error."""


class ConfigError(VitasksError):
    """A config file, key or value is wrong."""


class DataError(VitasksError):
    """A dataset, file or sample is wrong."""


class CheckpointError(VitasksError):
    """A checkpoint cannot be loaded safely or does not fit the model."""

"""Errors a user can cause. The CLI turns each into one line and exit code 1."""


class MergeVQError(Exception):
    """Base class: the message is meant for the user, as one line."""


class ConfigError(MergeVQError):
    """A recipe, an override or a combination of settings is invalid."""


class CheckpointError(MergeVQError):
    """A checkpoint is missing, malformed or does not match the model."""


class DataError(MergeVQError):
    """Input images or datasets are missing or unreadable."""

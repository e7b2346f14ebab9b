"""User-facing errors. The CLI prints these as one line (no traceback unless ``--debug``)."""


class VisalignError(ValueError):
    """A problem the user can fix: the message names the file, row or field and what to change."""


class ConfigError(VisalignError):
    """An invalid configuration value or file."""


class ModelError(VisalignError):
    """A user-facing problem with a model, checkpoint or adapter (one clear line, no traceback)."""

"""The one exception type users see: the CLI prints its message on one line, without a traceback."""


class FinetuneError(Exception):
    """A mistake the user can fix (bad recipe key, missing file, malformed row, unknown model)."""


class ConfigError(FinetuneError):
    """A recipe key, value or combination is invalid."""


class DataError(FinetuneError):
    """A data file or row cannot be used."""

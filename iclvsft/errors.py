"""The project's error types: each carries one message that says what went wrong and what to do."""


class IclvsftError(Exception):
    """Base class; scripts print the message and exit with status 2 instead of a traceback."""


class ConfigError(IclvsftError):
    """A bad config key or value, an unknown task or model name."""


class DataError(IclvsftError):
    """A missing or corrupt data file, or a generated item that fails its own checks."""

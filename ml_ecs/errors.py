"""The errors a bad config or bad data raise (one line each, naming the field or the file)."""


class ConfigError(ValueError):
  """A config field has a value that is not allowed."""


class DataError(ValueError):
  """A data file is missing or malformed (the message names the file)."""

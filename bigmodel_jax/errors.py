"""The one exception type for bad input: main prints its message as one line and exits non-zero."""


class UserError(Exception):
  """Bad input from the user (config, flags, data, checkpoint). The message says what and how to fix it."""


class NonFiniteLossError(UserError):
  """Training produced a NaN/Inf loss or gradient; the last good checkpoint is kept."""


class ModelMismatchError(UserError):
  """A checkpoint's parameter shapes differ from the model the config builds. `diffs`: {name: (saved, now)}."""

  def __init__(self, message: str, diffs: dict[str, tuple]):
    super().__init__(message)
    self.diffs = diffs

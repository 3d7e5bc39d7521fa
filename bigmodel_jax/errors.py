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


class DamagedCheckpointError(UserError):
  """A checkpoint step's files differ from the digest written when it was saved. `detail`: which file and how."""

  def __init__(self, message: str, step: int, detail: str):
    super().__init__(message)
    self.step, self.detail = step, detail


TRACEBACK_ENV = "BIGMODEL_JAX_TRACEBACK"  # =1: print the full traceback behind a one-line error
TRACEBACK_HINT = f"full traceback: --verbosity=1 or {TRACEBACK_ENV}=1"


def where(e: BaseException) -> str:
  """'at models/cnn.py:45 in __call__ (TypeError: ...)': the innermost frame outside jax/flax/optax, and the error."""
  import traceback
  frames = [f for f in traceback.extract_tb(e.__traceback__)
            if not any(part in f.filename for part in ("/jax/", "/jaxlib/", "/flax/", "/optax/", "/contextlib.py"))]
  lines = [line for line in str(e).strip().splitlines() if line.strip()] or [repr(e)]
  text = f"({type(e).__name__}: {lines[-1][:200]})"
  if not frames:
    return text
  frame = frames[-1]
  path = frame.filename
  for root in ("bigmodel_jax/", "site-packages/"):
    if root in path:
      path = path[path.rindex(root):]
      break
  return f"at {path}:{frame.lineno} in {frame.name} {text}"

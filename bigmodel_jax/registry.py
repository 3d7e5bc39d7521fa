"""Name -> constructor registries (models, tasks, datasets, optimizers) with helpful lookup errors."""

import difflib
from typing import Callable, Generic, TypeVar

from bigmodel_jax.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
  """A named table of constructors; `get` fails with the valid names and a suggestion."""

  def __init__(self, kind: str, field: str):
    self.kind = kind  # e.g. "model"
    self.field = field  # the config field that selects it, e.g. "config.model.name"
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def add(entry: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} registered twice")
      self._entries[name] = entry
      return entry
    return add

  def names(self) -> list[str]:
    return sorted(self._entries)

  def get(self, name: str) -> T:
    if name in self._entries:
      return self._entries[name]
    close = difflib.get_close_matches(name, self.names(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"{self.field}: unknown {self.kind} {name!r}{hint}; valid: {', '.join(self.names())}")


def import_submodules(package: str) -> None:
  """Imports every module of `package` (e.g. 'bigmodel_jax.models'), so each registers itself: adding a file
  with one `@REGISTRY.register(name)` line is all it takes, no import list to edit."""
  import importlib
  import pkgutil
  module = importlib.import_module(package)
  for info in sorted(pkgutil.iter_modules(module.__path__), key=lambda m: m.name):
    if not info.name.startswith("_"):
      importlib.import_module(f"{package}.{info.name}")

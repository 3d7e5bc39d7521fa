"""Models by name: `config.model.name` -> a Flax NNX module.

Every model is called as `model(inputs, train=bool, rngs=nnx.Rngs|None)` and is built from the
fields of config.model (besides `name`) plus what the dataset implies (input shape, output size).
Adding a model is one file in this package with one `@MODELS.register("name")` line: the package imports
every module it holds, so there is no list to edit.
"""

import inspect

from flax import nnx

from bigmodel_jax.errors import UserError
from bigmodel_jax.registry import Registry, import_submodules

MODELS: Registry = Registry("model", "config.model.name")

ACTIVATIONS: Registry = Registry("activation", "config.model.activation")
for _name, _fn in {"relu": nnx.relu, "gelu": nnx.gelu, "tanh": nnx.tanh, "sigmoid": nnx.sigmoid, "silu": nnx.silu,
                   "elu": nnx.elu}.items():
  ACTIVATIONS.register(_name)(_fn)


def require_positive(**fields) -> None:
  """Size fields of config.model (layers, widths, heads, ...; each entry of a list of sizes) must be >= 1."""
  for name, value in fields.items():
    for v in value if isinstance(value, (list, tuple)) else (value,):
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        each = "each entry " if isinstance(value, (list, tuple)) else ""
        raise UserError(f"config.model.{name}: {each}must be an integer >= 1, got {value!r}")


def activation(name: str):
  return ACTIVATIONS.get(name)


# Constructor arguments that come from the dataset and task, not from config.model.
DATA_ARGS = ("input_shape", "num_outputs", "rngs", "vocab_size")


def model_kwargs(model_config) -> dict:
  """config.model minus its name, checked against the constructor so a stray field is named."""
  cls = MODELS.get(model_config.name)
  kwargs = {k: v for k, v in model_config.items() if k != "name"}
  params = inspect.signature(cls.__init__).parameters
  for key in kwargs:
    if key not in params or key in DATA_ARGS:
      valid = [p for p in params if p not in ("self", *DATA_ARGS)]
      raise UserError(f"config.model.{key}: not a field of model {model_config.name!r} (valid: {', '.join(valid)}); "
                      f"to change config.model.name, use a config built with model_config({model_config.name!r})")
  return kwargs


def build_model(model_config, *, input_shape: tuple[int, ...], num_outputs: int, rngs: nnx.Rngs,
                vocab_size: int = 0) -> nnx.Module:
  """The model named by config.model; `vocab_size` reaches models that read token ids."""
  cls = MODELS.get(model_config.name)
  kwargs = model_kwargs(model_config)
  if "vocab_size" in inspect.signature(cls.__init__).parameters:
    kwargs["vocab_size"] = vocab_size
  return cls(input_shape=input_shape, num_outputs=num_outputs, rngs=rngs, **kwargs)


import_submodules(__name__)  # every module of this package registers its models

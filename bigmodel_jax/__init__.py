"""bigmodel_jax: an experiment is a config file."""

__version__ = "0.1.0"

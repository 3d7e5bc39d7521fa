"""bigmodel_jax: an experiment is a config file."""

import time

__version__ = "0.1.0"
# When this process first imported the package (python -m bigmodel_jax.main imports it before anything else):
# start-up is measured from here. The OS's process start time is not used: it is the fork's, which for a
# process exec'd by a long-lived shell or launcher can be long before this program began.
IMPORT_TIME = time.time()

import sys as _sys

# python -m bigmodel_jax.main: Ctrl-C / SIGTERM are handled from here on (interrupts.py), before main.py is even
# compiled. Only for that command: importing the package elsewhere (a notebook, a sweep driver) changes nothing.
if _sys.orig_argv[1:3] == ["-m", "bigmodel_jax.main"] and _sys.argv[:1] == ["-m"]:
  from bigmodel_jax import interrupts as _interrupts
  _interrupts.install()

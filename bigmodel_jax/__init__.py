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

import os as _os

# XLA:CPU: convolutions by its Eigen kernels rather than YNNPACK fusions. Measured per train step on 2 cores
# (benchmarks/NOTES.md): the seed CNN 121 -> 172 steps/s, fashion_mnist_resnet 2.3 -> 3.4, mnist_dcgan 3.5 -> 3.8;
# models without convolutions are untouched, and it changes nothing on GPUs and TPUs. Read by XLA when the first
# backend starts, so it applies wherever this package is imported before JAX's first computation; XLA_FLAGS that
# already name the option are left as they are (the way to opt out). Both ends of our jax range accept the flag
# (an unknown one would abort the process: CI runs both).
CPU_CONVOLUTION_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
if "xla_cpu_experimental_ynn_fusion_type" not in _os.environ.get("XLA_FLAGS", ""):
  _os.environ["XLA_FLAGS"] = f"{_os.environ.get('XLA_FLAGS', '')} {CPU_CONVOLUTION_FLAG}".strip()

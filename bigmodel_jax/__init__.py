"""bigmodel_jax: an experiment is a config file."""

import time

__version__ = "0.1.0"
# When this process first imported the package (python -m bigmodel_jax.main imports it before anything else):
# start-up is measured from here. The OS's process start time is not used: it is the fork's, which for a
# process exec'd by a long-lived shell or launcher can be long before this program began.
IMPORT_TIME = time.time()

"""Entry module of the `--stub-wasi` build: app.py with its stderr lines switched off.

componentize-py's --stub-wasi replaces every WASI function with one that traps
(`unreachable`), stderr included, so the first stderr write would kill the instance. The
flag is set while componentize-py pre-initialises the module, so the built component has
it baked in. Everything else is app.py's code unchanged.
"""

import app

app.STDERR = False

from app import WitWorld  # noqa: E402,F401  (componentize-py looks for WitWorld here)

"""Root test setup: notebooks (executed by nbmake) run at smoke size and import this checkout.

nbmake starts each notebook's kernel as a subprocess, which inherits this environment.
"""

import os
from pathlib import Path

os.environ.setdefault("LLMFN_SMOKE", "1")  # a tiny model trained for a few steps: see llmfn.inspect.notebook_run
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))

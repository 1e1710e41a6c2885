"""Files written whole or not at all.

A run directory is read while it is being written (by `sample.py`, a notebook, a resumed
run), and a run can be killed at any moment: every file llmfn writes outside Orbax goes
through `atomic_write`, so a reader sees the old file or the new one, never half of one.
"""

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path, binary: bool = False):
    """Yields a file open for writing; on a clean exit it replaces `path` in one step.

    The data goes to a temporary file beside `path` (same filesystem), which `os.replace`
    renames over `path`; on an error the temporary file is removed and `path` is untouched.
    Parent directories are created. Text is UTF-8.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

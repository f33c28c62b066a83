"""Files written whole or not at all."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename: a crash or
    kill while writing leaves the previous file whole, and readers never see half a file. The
    temporary name is the process's and thread's own, so concurrent writers do not share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

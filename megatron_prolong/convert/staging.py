"""Output directories that appear only when complete: written as OUT.partial, renamed at the end,
removed if the conversion fails."""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator

from megatron_prolong.convert.errors import ConversionError


@contextlib.contextmanager
def staged_output(out_dir: str, overwrite: bool) -> Iterator[str]:
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConversionError(f"{out_dir}: exists and is not empty; pass --overwrite or choose another")
    tmp = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)

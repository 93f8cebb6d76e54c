"""All-or-nothing output: build in a temporary folder beside the target, rename at the end.

`staged_output(out, overwrite)` refuses an existing non-empty `out` up front (unless `overwrite`),
yields a fresh hidden folder `.<name>.tmp-XXXX` in the same parent (same filesystem, so the final
rename is atomic), and on success swaps it into place; on any error, Ctrl-C included, the temporary
folder is removed and `out` is left exactly as it was. A process killed with SIGKILL can leave a
`.<name>.tmp-*` folder behind; it is never mistaken for output and can be deleted by hand.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_output(out: Path, overwrite: bool) -> None:
    """Raise FileExistsError if `out` holds something and `overwrite` is off."""
    if overwrite or not out.exists():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    raise FileExistsError(f"output {out} already exists; pass --overwrite (overwrite=True) to replace it")


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    out = Path(out).absolute()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the output gets ordinary permissions
    try:
        yield tmp
        _commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    check_output(out, overwrite)  # again: something may have appeared while we worked
    old = None
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()
        else:  # move the old output aside first, so a failure here loses nothing
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

"""Write files atomically: a reader (or a crash) never sees a partial output file.

The data goes to a temporary file in the destination's folder, is flushed and fsynced, gets the
permissions a plain `open()` would give it (mkstemp creates 0600), and is renamed over the
destination; the folder is fsynced so the rename survives a crash. Imports no torch
(write_atomically imports it when called without `save`): a server on a warm cache never loads it.
"""

import os
import tempfile
from contextlib import contextmanager
from typing import Callable, IO, Iterator, Optional


def current_umask() -> int:
    """The process's umask (read by setting it, then restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str, mode: str = "wb") -> Iterator[IO]:
    """`with atomic_file(p) as f: f.write(...)`: p appears complete or not at all."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text_atomically(path: str, text: str):
    """`text` to `path` atomically, creating its folder if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(str(path), "w") as f:
        f.write(text)


def write_atomically(obj, path: str, save: Optional[Callable] = None):
    """save(obj, f) to `path` atomically; `save` defaults to torch.save."""
    if save is None:
        import torch

        save = torch.save
    with atomic_file(path) as f:
        save(obj, f)

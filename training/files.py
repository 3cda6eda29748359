"""File modes: what the toolkit writes is readable as the user's umask says.

safetensors (0.7 and newer) writes through a private temporary file that it renames, so its files come out 0600
whatever the umask: on a shared server, nobody else could read a LoRA, a checkpoint or a prepared entry. Every
safetensors file the toolkit writes is given the mode a plain `open()` would have given it.
"""

import os
from pathlib import Path


def current_umask():
    """The process's umask, read without changing it where Linux shows it (os.umask can only swap it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_like_umask(*paths):
    """Give each file (and every file below each folder) in `paths` the mode `open()` would give a new file."""
    mode = 0o666 & ~current_umask()
    for path in map(Path, paths):
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
        for file in files:
            if (file.stat().st_mode & 0o777) != mode:
                os.chmod(file, mode)

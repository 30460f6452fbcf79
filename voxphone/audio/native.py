"""Where the C libraries voxphone calls directly (libswresample, libopus) are found.

PyAV's wheels ship FFmpeg and the codec libraries it links (``av.libs/lib<name>-<hash>.so``);
voxphone binds the very same files with ctypes, so one copy of each library serves both and
nothing more is installed. Where PyAV was built against the system's FFmpeg, the system's
libraries are used.
"""

from __future__ import annotations

import ctypes.util
from pathlib import Path

import av

from voxphone.errors import DecodeError


def find_library(name: str) -> str:
    """The path (or soname) of ``lib<name>``: PyAV's bundled copy, else the system's.
    Raises ``DecodeError`` naming the fix when there is neither."""
    bundled = Path(av.__file__).parent.parent / "av.libs"
    for path in sorted(bundled.glob(f"lib{name}-*.so*")):
        return str(path)
    found = ctypes.util.find_library(name)
    if found is None:
        raise DecodeError(
            f"lib{name} not found next to PyAV or on the system; reinstall PyAV from its "
            "wheel (pip install --force-reinstall av)"
        )
    return found

"""The name every CPU benchmark's results carry, from one place."""

from __future__ import annotations

import os
import platform


def machine_name() -> str:
    """``<cores>core-<arch>`` (``2core-x86_64``): in result file names and JSON, so runs on
    different machines never overwrite each other and a figure says where it was measured."""
    return f"{os.cpu_count()}core-{platform.machine()}"

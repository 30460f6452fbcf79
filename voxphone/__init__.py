"""voxphone: phone and browser calls in, live transcript events out."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

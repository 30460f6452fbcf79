"""The HTTP surface: health, readiness and the calls API (aiohttp, on the one event loop)."""

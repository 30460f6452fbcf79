"""Audio DSP: synchronous process()/flush()/reset() stages with no I/O and no asyncio."""

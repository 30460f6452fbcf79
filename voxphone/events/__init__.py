"""Events: the envelope every sink receives, and the sinks that deliver it."""

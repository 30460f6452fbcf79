"""The end-to-end tests use the integration tests' webhook receiver."""

from tests.integration.conftest import receiver

__all__ = ["receiver"]

"""Exit codes shared by every command: operators' scripts branch on them."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "EXIT_OK"]

"""Helpers shared by test modules."""

from __future__ import annotations

import os

import pytest


def require(available: bool, what: str) -> None:
    """Skip when a tool the test extra installs is missing on a developer's machine; fail under CI=true.

    In CI the test extra is always installed, so a missing tool means a broken install: it must turn the
    run red, not quietly skip the acceptance check.
    """
    if available:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} is missing, but CI installs the test extra: the install is broken")
    pytest.skip(f"{what} is not installed (pip install -e '.[test]')", allow_module_level=True)

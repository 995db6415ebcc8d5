"""Waiting for a condition with a deadline, for the lab, the demo and the tests (never a bare sleep that hopes)."""

from __future__ import annotations

import time
from typing import Any, Callable

from ..errors import TenureError


class WaitTimedOut(TenureError, AssertionError):
    """A condition did not hold before its deadline (an AssertionError too, so a test fails with it)."""


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``cond`` until it returns something truthy and return that; WaitTimedOut after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimedOut(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)

"""Fixtures shared by the hostile-input tests."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_delivered() -> Iterator[None]:
    """Let Ctrl-C reach these tests even when pytest was started in the background (``cmd &`` without job
    control ignores SIGINT, and that is inherited by the children these tests interrupt): the interruption tests
    are about what graphprune does with a SIGINT, so they need one to arrive. Python's handlers are reset to the
    default in a child at exec, so restoring ours here covers both in-process and subprocess runs."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

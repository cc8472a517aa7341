"""Shared fixtures: the default device, state directories, and managers that are always
closed (and their state directory unlocked) at the end of a test, even when it fails."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from firmware.inventory import Device, load_device
from firmware.manager import ResourceManager, StateDir, open_manager


@pytest.fixture(scope="session")
def device() -> Device:
    return load_device()


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    return StateDir(tmp_path / "state")


@pytest.fixture
def open_rm(state: StateDir) -> Iterator[Callable[[], ResourceManager]]:
    """Open (or re-open, after closing the previous one) a manager on ``state``."""
    opened: list[ResourceManager] = []

    def _open() -> ResourceManager:
        m = open_manager(state)
        opened.append(m)
        return m

    yield _open
    for m in opened:
        m.close()  # closing twice is harmless: a test may have closed it already
    state.unlock()


@pytest.fixture
def rm(open_rm: Callable[[], ResourceManager]) -> ResourceManager:
    return open_rm()


def reopen(
    m: ResourceManager, state: StateDir, open_rm: Callable[[], ResourceManager]
) -> ResourceManager:
    """Close ``m`` as a clean shutdown would and recover a new manager from the ledger."""
    m.close()
    state.unlock()
    return open_rm()

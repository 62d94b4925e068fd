"""Stopping what the tools started: a process group, or a lone process that leads none."""

from __future__ import annotations

import subprocess
import time

import pytest

from gpufleet.workers.tools.launch import stop_process


@pytest.mark.parametrize("own_session", [True, False])
def test_stop_process_ends_it_whether_or_not_it_leads_a_group(own_session: bool) -> None:
    process = subprocess.Popen(["sleep", "60"], start_new_session=own_session)
    started = time.monotonic()
    stop_process(process, timeout_s=5)
    assert process.returncode is not None
    assert time.monotonic() - started < 5  # SIGTERM reached it: no wait for the timeout


def test_stop_process_kills_what_ignores_sigterm() -> None:
    process = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 60"], start_new_session=True)
    time.sleep(0.2)  # the trap is set
    stop_process(process, timeout_s=0.5)
    assert process.returncode == -9

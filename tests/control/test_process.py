"""The supervised-child skeleton (control/process.py) that runs exabgp, bird, etcd
and the lab's operator, driven with small shell children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ciliate.control.process import ChildError, ChildProcess, netns_path, stop_child


class StartFailed(RuntimeError):
    """A caller's own error type, as bgp.py and tor.py pass theirs."""


def _sh(tmp_path: Path, script: str, **kwargs: object) -> ChildProcess:
    return ChildProcess(
        name="child",
        argv=["sh", "-c", script],
        log_path=tmp_path / "child.log",
        **kwargs,  # type: ignore[arg-type]
    )


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


def test_a_child_is_waited_for_then_stopped_and_reaped(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = _sh(tmp_path, f"echo starting; touch {ready}; exec sleep 60")
    child.start()
    pid = child.pid
    assert pid is not None and child.running
    child.wait_until(ready.exists, timeout=10, what="get ready")
    assert "starting" in child.log_tail()
    child.stop(timeout=5)
    assert child.pid is None and not child.running
    assert not Path(f"/proc/{pid}").exists()  # reaped, not a zombie
    child.stop(timeout=5)  # idempotent


def test_a_child_that_exits_while_starting_raises_the_callers_error_with_its_log(
    tmp_path: Path,
) -> None:
    child = _sh(tmp_path, "echo 'bad config line 3' >&2; exit 3")
    child.start()
    with pytest.raises(StartFailed, match=r"child exited with 3: bad config line 3"):
        child.wait_until(lambda: False, timeout=10, what="get ready", error=StartFailed)
    assert not child.running


def test_a_child_that_is_not_ready_in_time_is_killed(tmp_path: Path) -> None:
    child = _sh(tmp_path, "exec sleep 60")
    child.start()
    pid = child.pid
    assert pid is not None
    with pytest.raises(ChildError, match=r"did not answer within 0\.2 s"):
        child.wait_until(lambda: False, timeout=0.2, what="answer")
    assert not Path(f"/proc/{pid}").exists()


def test_a_child_ignoring_the_signal_is_killed_after_the_timeout(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = _sh(tmp_path, f"trap '' TERM; touch {ready}; while :; do sleep 0.05; done")
    child.start()
    child.wait_until(ready.exists, timeout=10, what="get ready")
    pid = child.pid
    assert pid is not None
    child.stop(timeout=0.3)
    assert not Path(f"/proc/{pid}").exists()


def test_the_log_tail_shows_only_the_last_start(tmp_path: Path) -> None:
    child = _sh(tmp_path, "echo first run; exit 1")
    child.start()
    with pytest.raises(ChildError):
        child.wait_until(lambda: False, timeout=10, what="x")
    child.argv = ["sh", "-c", "echo second run; exit 2"]
    child.start()
    with pytest.raises(ChildError) as caught:
        child.wait_until(lambda: False, timeout=10, what="x")
    assert "second run" in str(caught.value) and "first run" not in str(caught.value)
    assert "first run" in (tmp_path / "child.log").read_text()  # the log is appended to


def test_a_running_child_cannot_be_started_twice(tmp_path: Path) -> None:
    child = _sh(tmp_path, "exec sleep 60")
    child.start()
    try:
        with pytest.raises(ChildError, match="already running"):
            child.start()
    finally:
        child.kill()
    assert child.pid is None


def test_die_with_parent_kills_the_child_when_its_parent_dies(tmp_path: Path) -> None:
    """The owner killed hard: its daemon must not outlive it (PR_SET_PDEATHSIG)."""
    pid_file = tmp_path / "pid"
    owner_script = f"""
import time
from pathlib import Path
from ciliate.control.process import ChildProcess
child = ChildProcess(name="sleeper", argv=["sleep", "60"], log_path=Path("{tmp_path}/s.log"),
                     die_with_parent=True)
child.start()
Path("{pid_file}").write_text(str(child.pid))
time.sleep(60)
"""
    owner = subprocess.Popen([sys.executable, "-c", owner_script])
    try:
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and owner.poll() is None
            time.sleep(0.02)
        daemon = int(pid_file.read_text())
        assert not _gone(daemon)
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 5
        while not _gone(daemon):
            assert time.monotonic() < deadline, "the daemon outlived its owner"
            time.sleep(0.02)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def test_stop_child_sends_the_signal_asked_for(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        ["sh", "-c", f"trap 'exit 7' INT; touch {ready}; while :; do sleep 0.05; done"],
    )
    deadline = time.monotonic() + 10
    while not ready.exists():  # the trap is set
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stop_child(proc, timeout=5, sig=signal.SIGINT)
    assert proc.returncode == 7


def test_a_namespace_is_named_or_given_by_path() -> None:
    assert netns_path("lab-node1") == "/run/netns/lab-node1"
    assert netns_path("/proc/1/ns/net") == "/proc/1/ns/net"
    assert os.path.isabs(netns_path("x"))


def test_a_command_line_runs_setpriv_and_nsenter_around_the_daemon(tmp_path: Path) -> None:
    child = ChildProcess(
        name="d", argv=["d", "-f"], log_path=tmp_path / "d.log", netns="ns1", die_with_parent=True
    )
    command = child.command
    assert command[:2] == ["nsenter", "--net=/run/netns/ns1"]
    assert command[-2:] == ["d", "-f"]
    with pytest.raises(ValueError, match="empty command line"):
        ChildProcess(name="d", argv=[], log_path=tmp_path / "d.log")

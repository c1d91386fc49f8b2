"""One agent per node: an exclusive lock on each place the agent owns.

An agent owns its state directory (the store), the directory of its API
socket (the socket and the CNI relay's DEL queue beside it) and its bpffs
root (the pinned maps and links). A second agent on any of them, in the same
network namespace or another one, would rebind the socket or "reconcile"
the first agent's pods away, so it must refuse before it touches anything.

The lock is ``flock(2)`` on each directory itself: bpffs holds no regular
files, so a lock file is not possible there, and a directory lock needs no
clean-up. The kernel drops a flock when its holder dies, so a killed agent
leaves no stale lock behind. The holder's PID comes from ``/proc/locks``,
which names the process that took the lock.

Paths alone do not make a node: an agent started by hand with its default
paths beside one a unit runs with others met no lock, took cilium_host's
program and removed every pod veth it had no record of. The node is its
network namespace, so the agent also holds a name there
(:class:`NamespaceLock`): an abstract UNIX socket, which the kernel scopes to
the network namespace and frees when its holder dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PROC_LOCKS = Path("/proc/locks")


class AgentLockError(Exception):
    """The agent could not take its lock on a place it owns."""


class AgentLockedError(AgentLockError):
    """Another process (another agent) holds the lock."""

    def __init__(self, *, what: str, path: Path, holder: int | None) -> None:
        self.what = what
        self.path = path
        self.holder = holder
        who = f"another agent (pid {holder})" if holder else "another agent"
        super().__init__(
            f"{who} already runs on {what} {path}: stop it first, or give this agent "
            "a --state-dir, --socket and --bpffs-root of its own"
        )


class NamespaceLockedError(AgentLockError):
    """Another agent runs in this network namespace (with other paths)."""

    def __init__(self, holder: int | None) -> None:
        self.holder = holder
        who = f"another agent (pid {holder})" if holder else "another agent"
        super().__init__(
            f"{who} already runs in this network namespace (the node's, whatever its "
            "--state-dir, --socket and --bpffs-root): stop it first; one agent per node"
        )


class LockPathError(AgentLockError):
    """A place to lock cannot be created or opened."""


@dataclass(frozen=True)
class Place:
    """A directory the agent owns; ``what`` names it in messages."""

    what: str
    path: Path
    mode: int = 0o700


class AgentLock:
    """Exclusive flocks on a set of directories, taken all or none. When
    one cannot be taken, the others are dropped and the directories this
    call created are removed again."""

    def __init__(self, places: Sequence[Place]) -> None:
        self._fds: list[int] = []
        with contextlib.ExitStack() as undo:
            undo.callback(self.release)
            seen: set[tuple[int, int]] = set()
            for place in places:
                fd = _open_dir(place, undo)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) in seen:
                    # Two flags naming one directory: a second flock on another
                    # open file of it would conflict with our own first one.
                    os.close(fd)
                    continue
                seen.add((st.st_dev, st.st_ino))
                self._fds.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise AgentLockedError(
                        what=place.what, path=place.path, holder=lock_holder(st)
                    ) from None
            undo.pop_all()

    def release(self) -> None:
        """Closing the descriptors drops the locks."""
        while self._fds:
            os.close(self._fds.pop())


def _open_dir(place: Place, undo: contextlib.ExitStack) -> int:
    """Open the directory, creating it (and its missing parents) if needed;
    ``undo`` removes what was created, innermost first."""
    missing = [p for p in (place.path, *place.path.parents) if not p.exists()]
    for created in reversed(missing):  # outermost registered first, so undone last
        undo.callback(_remove_empty_dir, created)
    try:
        place.path.mkdir(parents=True, exist_ok=True, mode=place.mode)
        # O_CLOEXEC: a child (exabgp, a helper) must not inherit the lock and
        # keep it after the agent is gone.
        return os.open(place.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise LockPathError(
            f"{place.what} {place.path}: cannot create or open it ({exc.strerror or exc})"
        ) from exc


def _remove_empty_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (someone else's now), or gone
        path.rmdir()


def lock_holder(st: os.stat_result) -> int | None:
    """The PID holding a flock on the file ``st`` describes, from
    ``/proc/locks`` (lines like ``1: FLOCK ADVISORY WRITE 1234 00:27:5707 0 EOF``,
    device in hex); None when unknown (e.g. another PID namespace)."""
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        lines = PROC_LOCKS.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":  # "->" lines are waiters
            continue
        try:
            major, minor, inode = fields[5].split(":")
            pid = int(fields[4])
            found = (int(major, 16), int(minor, 16), int(inode))
        except ValueError:
            continue
        if found == wanted and pid > 0:
            return pid
    return None


# Abstract UNIX socket names belong to the network namespace of the socket.
NAMESPACE_LOCK_NAME = b"\0ciliate-agent"
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NamespaceLock:
    """The agent's name in its network namespace: bound and listening, so a second
    agent's bind fails and its connect learns the holder's PID (SO_PEERCRED gives
    the listener's). Nothing is ever accepted."""

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(NAMESPACE_LOCK_NAME)
        except OSError:
            sock.close()
            raise NamespaceLockedError(namespace_lock_holder()) from None
        sock.listen(1)
        self._sock: socket.socket | None = sock

    def release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def namespace_lock_holder() -> int | None:
    """The PID of the process holding :data:`NAMESPACE_LOCK_NAME` here, or None."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)  # a full backlog would block the connect
        try:
            probe.connect(NAMESPACE_LOCK_NAME)
            pid, _, _ = _UCRED.unpack(
                probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
        except OSError:
            return None
    return pid if pid > 0 else None

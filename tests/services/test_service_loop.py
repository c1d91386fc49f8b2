"""The agent's service loop over a real datapath (the testbed's loaded programs and
maps): a pass writes only the frontends that changed (the load balancer's writes
counted), deletes only those gone, and a resync (on request, after a failed pass)
puts back what an incremental pass cannot see."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.agent.services import ServiceController
from ciliate.control.objects import KINDS, ObjectStore
from ciliate.control.store import SqliteStore, StoreUnavailableError, Txn
from ciliate.datapath.lb import LoadBalancer
from ciliate.datapath.testbed import Testbed

COUNT = 30


def service(name: str, app: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": app}, "ports": [{"port": 80, "targetPort": 8080}]},
    }


def pod(name: str, app: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"containers": [{"name": "c"}]},
    }


@pytest.fixture(scope="module")
def testbed(bpf_objects: str) -> Iterator[Testbed]:
    with Testbed(prefix="cst") as tb:
        if not tb.datapath.has_services:
            pytest.skip("the datapath was built without services")
        yield tb


class Counted:
    """Counts the calls of the load balancer's writes (the real ones run)."""

    def __init__(self, tb: Testbed, monkeypatch: pytest.MonkeyPatch) -> None:
        self.upserts: list[str] = []
        self.deletes: list[str] = []
        lb = tb.datapath.lb
        upsert, delete = lb.upsert_service, lb.delete_service

        def counted_upsert(frontend: Any, *args: Any, **kwargs: Any) -> Any:
            self.upserts.append(str(frontend))
            return upsert(frontend, *args, **kwargs)

        def counted_delete(frontend: Any) -> bool:
            self.deletes.append(str(frontend))
            return delete(frontend)

        monkeypatch.setattr(lb, "upsert_service", counted_upsert)
        monkeypatch.setattr(lb, "delete_service", counted_delete)

    def clear(self) -> None:
        self.upserts.clear()
        self.deletes.clear()


class FailingNodeStore:
    """The node's real store whose next transaction fails (a full disk, a lock)."""

    def __init__(self, inner: SqliteStore) -> None:
        self._inner = inner
        self.fail_next = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def transaction(self) -> AbstractContextManager[Txn]:
        if self.fail_next:
            self.fail_next = False
            raise StoreUnavailableError("database is locked")
        return self._inner.transaction()


@dataclass
class Loop:
    controller: ServiceController
    objects: ObjectStore
    counted: Counted
    node_store: FailingNodeStore
    lb: LoadBalancer
    restart: Callable[[], ServiceController]

    def in_maps(self) -> dict[str, list[str]]:
        return {str(s.frontend): [str(b.address) for b in s.backends] for s in self.lb.list()}


@pytest.fixture
def loop(testbed: Testbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Loop]:
    testbed.reset()
    with SqliteStore(tmp_path / "state.db") as store:
        objects = ObjectStore(store)
        docs: list[dict[str, Any]] = []
        for i in range(COUNT):
            docs += [service(f"s{i}", f"a{i}"), pod(f"p{i}", f"a{i}")]
        objects.apply(docs)
        pods = {f"default/p{i}": f"10.244.0.{i + 10}" for i in range(COUNT)}
        node_store = FailingNodeStore(store)

        def start() -> ServiceController:
            return ServiceController(
                objects_store=store,
                node_store=node_store,  # type: ignore[arg-type]
                revision=store.revision,
                datapath=testbed.datapath,
                node_name="node-a",
                node_ips=[],
                local_endpoints=lambda: list(pods.items()),
            )

        controller = start()
        counted = Counted(testbed, monkeypatch)
        first = controller.sync()
        assert first.full and len(counted.upserts) == COUNT
        controller.sync()  # its own slice writes come back: compared, nothing written
        counted.clear()
        yield Loop(controller, objects, counted, node_store, testbed.datapath.lb, start)
    testbed.datapath.lb.clear()


def test_one_new_service_among_many_is_the_only_one_recomputed_and_written(loop: Loop) -> None:
    assert not loop.controller.sync().written and loop.counted.upserts == []
    loop.objects.apply([service("new", "a3")])
    result = loop.controller.sync()
    assert result.services_recomputed == 1 and not result.full
    (written,) = loop.counted.upserts
    vip = loop.objects.get(KINDS["Service"], name="new")["spec"]["clusterIP"]
    assert written == f"{vip}:80/TCP" and result.written == [written]
    assert loop.in_maps()[written] == ["10.244.0.13"]
    # One pod leaves a selector: that service alone is rewritten (with no backend).
    loop.counted.clear()
    loop.objects.apply([pod("p5", "elsewhere")])
    result = loop.controller.sync()
    assert result.services_recomputed == 1 and len(loop.counted.upserts) == 1
    assert loop.in_maps()[loop.counted.upserts[0]] == []
    loop.counted.clear()
    loop.objects.delete(loop.objects.refs_of([service("new", "a3")]))
    loop.controller.sync()
    assert loop.counted.deletes == [written] and loop.counted.upserts == []


def test_a_frontend_lost_behind_the_loops_back_is_put_back_by_a_resync(loop: Loop) -> None:
    lost = sorted(loop.in_maps())[7]
    loop.lb.delete_service(next(s.frontend for s in loop.lb.list() if str(s.frontend) == lost))
    loop.counted.clear()
    assert not loop.controller.sync().written  # nothing changed in the objects: unseen
    assert lost not in loop.in_maps()
    loop.controller.resync()
    healed = loop.controller.sync()
    assert healed.full and healed.written == [lost] and loop.counted.upserts == [lost]


def test_a_failed_pass_is_followed_by_a_full_one_that_catches_up(loop: Loop) -> None:
    loop.objects.apply([service("late", "a1")])
    loop.node_store.fail_next = True  # the ids' transaction fails
    with pytest.raises(StoreUnavailableError):
        loop.controller.sync()
    assert loop.counted.upserts == []
    result = loop.controller.sync()
    assert result.full and len(loop.counted.upserts) == 1
    assert result.written == loop.counted.upserts


def test_a_restarted_loop_writes_only_what_changed_while_it_was_down(loop: Loop) -> None:
    before = loop.in_maps()
    loop.objects.apply([service("while-down", "a2")])
    loop.objects.delete(loop.objects.refs_of([service("s4", "a4")]))
    restarted = loop.restart()  # a new agent: the maps and the store are what is left
    result = restarted.sync()
    assert result.full
    assert len(loop.counted.upserts) == 1 and len(loop.counted.deletes) == 1
    after = loop.in_maps()
    assert set(before) - set(after) == set(loop.counted.deletes)
    assert set(after) - set(before) == set(loop.counted.upserts)
    assert after[loop.counted.upserts[0]] == ["10.244.0.12"]

"""The agent's objects API answers as the API server would, over a real SQLite store:
422 naming every field, 404 for unknown kinds and missing objects or namespaces, 403
for an immortal namespace, 500 for a full range; a refused apply stores nothing."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from ciliate.control.agent.objects_api import create_router
from ciliate.control.objects import configure_service_range
from ciliate.control.store import SqliteStore

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's note about httpx, not about this code
    from fastapi.testclient import TestClient


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, SqliteStore]]:
    with SqliteStore(tmp_path / "state.db") as store:
        app = FastAPI()
        app.include_router(create_router(store))
        with TestClient(app) as test_client:
            yield test_client, store


def service(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"ports": [{"port": 80}], **spec},
    }


def test_an_invalid_object_is_422_naming_the_field_and_stores_nothing(
    client: tuple[TestClient, SqliteStore],
) -> None:
    http, store = client
    before = dict(store.list(""))
    answer = http.post(
        "/v1/objects/apply",
        json={"objects": [service("ok"), service("bad", ports=[{"port": 80, "nodePort": 30000}])]},
    )
    assert answer.status_code == 422
    assert answer.json()["detail"] == (
        'Service "bad" is invalid: spec.ports[0].nodePort: Forbidden: may not be used when'
        " `type` is 'ClusterIP'"
    )
    assert dict(store.list("")) == before


def test_unknown_kinds_missing_objects_and_namespaces_are_404(
    client: tuple[TestClient, SqliteStore],
) -> None:
    http, _ = client
    unknown = http.post(
        "/v1/objects/apply",
        json={"objects": [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {}}]},
    )
    assert unknown.status_code == 404
    assert 'no matches for kind "Deployment" in version "apps/v1"' in unknown.json()["detail"]
    missing = http.get("/v1/objects/service/nothing")
    assert missing.status_code == 404
    elsewhere = http.post(
        "/v1/objects/apply",
        json={"objects": [{**service("s"), "metadata": {"name": "s", "namespace": "nowhere"}}]},
    )
    assert elsewhere.status_code == 404
    assert 'namespaces "nowhere" not found' in elsewhere.json()["detail"]


def test_deleting_the_default_namespace_is_403(client: tuple[TestClient, SqliteStore]) -> None:
    http, _ = client
    assert http.post("/v1/objects/apply", json={"objects": [service("s")]}).status_code == 200
    answer = http.delete("/v1/objects/namespace/default")
    assert answer.status_code == 403
    assert answer.json()["detail"] == (
        'namespaces "default" is forbidden: this namespace may not be deleted'
    )
    assert http.get("/v1/objects/service/s").status_code == 200


def test_a_full_range_is_500_and_takes_nothing(client: tuple[TestClient, SqliteStore]) -> None:
    http, store = client
    configure_service_range(store, "10.100.0.0/30")  # one address after the API server's
    assert http.post("/v1/objects/apply", json={"objects": [service("a")]}).status_code == 200
    before = dict(store.list(""))
    answer = http.post("/v1/objects/apply", json={"objects": [service("b")]})
    assert answer.status_code == 500
    assert "range is full" in answer.json()["detail"]
    assert dict(store.list("")) == before


def test_a_damaged_allocation_key_is_a_clear_500_and_writes_nothing(
    client: tuple[TestClient, SqliteStore],
) -> None:
    http, store = client
    assert http.post("/v1/objects/apply", json={"objects": [service("a")]}).status_code == 200
    summary = next(
        key
        for key, _ in store.list("objects-meta/allocations/clusterip/")
        if key.endswith("summary")
    )
    with store.transaction() as txn:  # an operator's hand edit, a torn disk
        txn.put(summary, b"not json at all")
    before = dict(store.list(""))
    answer = http.post("/v1/objects/apply", json={"objects": [service("b")]})
    assert answer.status_code == 500
    assert answer.json()["detail"].startswith("the node's object store: ")
    assert summary in answer.json()["detail"]
    assert dict(store.list("")) == before

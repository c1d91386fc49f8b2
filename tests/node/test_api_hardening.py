"""The agent's API under hostile or sloppy requests, sent to a real agent
on its UNIX socket: bad text is a 4xx naming the field, never a 500; junk
paths cannot grow /metrics; every 4xx an operation answers is in the
OpenAPI document; booleans are JSON booleans only. The agent keeps serving
after each."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import NodeLab


@pytest.fixture
def http(node_lab: NodeLab) -> Iterator[httpx.Client]:
    with httpx.Client(
        transport=httpx.HTTPTransport(uds=node_lab.node.socket), base_url="http://agent", timeout=30
    ) as client:
        yield client
    # Whatever a test sent, the agent still answers.
    assert node_lab.api.healthy()


# -- text that is not Unicode ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (rb'{"env": {"CNI_COMMAND": "ADD"}, "stdin": "{\"a\": \"\ud800\"}"}', "stdin"),
        (rb'{"env": {"CNI_COMMAND": "\udfff"}, "stdin": "{}"}', "CNI_COMMAND"),
        (rb'{"env": {"CNI_\ud83d": "ADD"}, "stdin": "{}"}', "env"),
    ],
    ids=["in stdin", "in an env value", "in an env name"],
)
def test_a_lone_surrogate_in_the_body_is_a_422_naming_the_field(
    http: httpx.Client, body: bytes, field: str
) -> None:
    response = http.post("/v1/cni", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert field in error["loc"]
    assert "surrogate" in error["msg"]


# -- /metrics stays bounded -----------------------------------------------------------------


def _latency_series(http: httpx.Client) -> list[dict[str, str]]:
    text = http.get("/metrics").text
    series = []
    for line in text.splitlines():
        if line.startswith("ciliate_api_request_seconds_count{"):
            labels = line[line.index("{") + 1 : line.rindex("}")]
            series.append(dict(re.findall(r'(\w+)="([^"]*)"', labels)))
    return series


def test_unknown_paths_and_methods_share_one_metrics_series(http: httpx.Client) -> None:
    junk = [f"/junk/{secrets.token_hex(8)}" for _ in range(40)]
    for path in junk:
        assert http.get(path).status_code == 404
    for method in ("BREW", "PURGE"):
        http.request(method, "/nowhere")
    assert http.get("/v1/endpoints/4242").status_code == 404

    series = _latency_series(http)
    paths = {s["path"] for s in series}
    assert not any(p.startswith(("/junk", "/nowhere")) for p in paths), paths
    assert {s["method"] for s in series} <= {"GET", "POST", "PUT", "DELETE", "other"}
    unmatched = [s for s in series if s["path"] == "unmatched"]
    assert {s["method"] for s in unmatched} >= {"GET", "other"}
    # A known route is counted under its template, not the concrete path.
    assert any(s["path"] == "/v1/endpoints/{endpoint_id}" and s["status"] == "404" for s in series)

    # More junk adds no series (the scrape above added its own, /metrics).
    before = len(_latency_series(http))
    for _ in range(20):
        http.get(f"/junk/{secrets.token_hex(8)}")
    assert len(_latency_series(http)) == before


# -- the OpenAPI document lists the 4xx answers ----------------------------------------------


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def _probes(method: str, path: str, operation: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Requests that an operation should refuse: each path parameter as a
    bad value and as an unknown one; an empty and a mistyped body."""
    params = re.findall(r"{(\w+)}", path)
    concrete = [path]
    if params:
        concrete = [re.sub(r"{\w+}", value, path) for value in ("not-a-number", "424242")]
    for url in concrete:
        if "requestBody" in operation:
            yield url, {}
            yield url, []
        else:
            yield url, None


def test_every_4xx_an_operation_answers_is_in_the_openapi_document(http: httpx.Client) -> None:
    document = http.get("/openapi.json").json()
    undocumented = []
    answered = set()
    for method, path, operation in _operations(document):
        for url, body in _probes(method, path, operation):
            if method != "GET" and body is None and "{" not in path:
                continue  # no refusal to provoke without side effects
            response = http.request(method, url, json=body)
            code = response.status_code
            assert code < 500, f"{method} {url}: {code} {response.text}"
            if 400 <= code < 500:
                answered.add(code)
                if str(code) not in operation["responses"]:
                    undocumented.append(f"{method} {path}: {code}")
    assert not undocumented, undocumented
    assert answered >= {404, 422}  # the probes did reach refusals
    # The documented error bodies say what they hold.
    endpoint = document["paths"]["/v1/endpoints/{endpoint_id}"]["get"]["responses"]["404"]
    assert endpoint["content"]["application/json"]["schema"]


# -- booleans are booleans ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["false", "true", 0, 1, "yes", None])
def test_a_boolean_field_takes_only_a_json_boolean(http: httpx.Client, value: object) -> None:
    before = http.get("/v1/status").json()["datapath"]["trace"]
    response = http.put("/v1/datapath/config", json={"trace": value})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "trace"]
    assert http.get("/v1/status").json()["datapath"]["trace"] == before


def test_a_json_boolean_is_accepted(http: httpx.Client) -> None:
    for value in (True, False):
        response = http.put("/v1/datapath/config", json={"trace": value})
        assert response.status_code == 200, response.text
        assert http.get("/v1/status").json()["datapath"]["trace"] is value

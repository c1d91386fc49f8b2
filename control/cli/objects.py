"""``ciliate apply | get | delete | policy trace``: cluster objects, as kubectl
handles them, kept by one node's agent (``--socket``) or straight in the cluster's
etcd (``--etcd-endpoint``), where every agent watches them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml

from ciliate.control.agent.client import DEFAULT_SOCKET, AgentClient, AgentUnreachableError
from ciliate.control.objects import (
    KINDS,
    MAX_MANIFEST_BYTES,
    Kind,
    ObjectsError,
    ObjectStore,
    decode_manifest,
    load_documents,
    resolve_kind,
)
from ciliate.control.policy.engine import compute
from ciliate.control.policy.evaluate import Ipcache, parse_port, trace
from ciliate.control.policy.inputs import input_from_objects
from ciliate.control.store import StoreError

__all__ = ["register", "target_options"]

DEFAULT_NAMESPACE = "default"


class CliError(Exception):
    """A refusal to print as it is (no traceback)."""


class Backend(Protocol):
    def apply(self, documents: list[dict[str, Any]]) -> list[dict[str, Any]]: ...
    def delete(
        self, documents: list[dict[str, Any]], *, ignore_missing: bool
    ) -> list[dict[str, Any]]: ...
    def list(self, kind: Kind, *, namespace: str | None) -> list[dict[str, Any]]: ...
    def get(self, kind: Kind, *, name: str, namespace: str | None) -> dict[str, Any]: ...
    def close(self) -> None: ...


class AgentBackend:
    """Through one agent's API (its SQLite store)."""

    def __init__(self, socket: str) -> None:
        self._client = AgentClient(socket)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            if method == "GET":
                return self._client.get(path)
            return self._client.post(path, body)
        except AgentUnreachableError as exc:
            raise CliError(str(exc)) from exc
        except RuntimeError as exc:
            # "METHOD PATH: STATUS BODY": show the server's detail, as kubectl does.
            _, _, answer = str(exc).partition(": ")
            status, _, text = answer.partition(" ")
            try:
                detail = json.loads(text).get("detail", text)
            except (json.JSONDecodeError, AttributeError):
                detail = text
            raise CliError(f"Error from server ({status}): {detail}") from exc

    def apply(self, documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(self._call("POST", "/v1/objects/apply", {"objects": documents})["results"])

    def delete(
        self, documents: list[dict[str, Any]], *, ignore_missing: bool
    ) -> list[dict[str, Any]]:
        body = {"objects": documents, "ignore_missing": ignore_missing}
        return list(self._call("POST", "/v1/objects/delete", body)["results"])

    def list(self, kind: Kind, *, namespace: str | None) -> list[dict[str, Any]]:
        query = f"?namespace={namespace}" if namespace else ""
        return list(self._call("GET", f"/v1/objects/{kind.key}{query}")["items"])

    def get(self, kind: Kind, *, name: str, namespace: str | None) -> dict[str, Any]:
        query = f"?namespace={namespace}" if namespace else ""
        return dict(self._call("GET", f"/v1/objects/{kind.key}/{name}{query}"))

    def trace(self, *, src: str, dst: str, protocol: int, port: int) -> dict[str, Any]:
        body = {"src": src, "dst": dst, "protocol": protocol, "port": port}
        answer: dict[str, Any] = self._call("POST", "/v1/policy/trace", body)
        return answer

    def close(self) -> None:
        self._client.close()


class EtcdBackend:
    """Straight into the cluster's etcd, under the prefix every agent uses."""

    def __init__(self, endpoint: str) -> None:
        from ciliate.control.store.etcd import EtcdStore

        self._store = EtcdStore([endpoint])
        self._objects = ObjectStore(self._store)

    def _guard(self, what: Any) -> Any:
        try:
            return what()
        except ObjectsError as exc:
            raise CliError(f"Error: {exc}") from exc
        except StoreError as exc:
            raise CliError(f"etcd at {self._store.endpoints[0]}: {exc}") from exc

    def apply(self, documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r.to_json() for r in self._guard(lambda: self._objects.apply(documents))]

    def delete(
        self, documents: list[dict[str, Any]], *, ignore_missing: bool
    ) -> list[dict[str, Any]]:
        return [
            r.to_json()
            for r in self._guard(
                lambda: self._objects.delete(
                    self._objects.refs_of(documents), ignore_missing=ignore_missing
                )
            )
        ]

    def list(self, kind: Kind, *, namespace: str | None) -> list[dict[str, Any]]:
        return list(self._guard(lambda: self._objects.list(kind, namespace=namespace)))

    def get(self, kind: Kind, *, name: str, namespace: str | None) -> dict[str, Any]:
        return dict(self._guard(lambda: self._objects.get(kind, name=name, namespace=namespace)))

    def close(self) -> None:
        self._store.close()


def _backend(args: argparse.Namespace) -> Backend:
    if args.etcd_endpoint:
        return EtcdBackend(args.etcd_endpoint)
    return AgentBackend(args.socket)


def _read(paths: Sequence[str]) -> list[dict[str, Any]]:
    documents = []
    for path in paths:
        # Read one byte past the limit: enough to refuse a huge file without holding it.
        if path == "-":
            data, source = sys.stdin.buffer.read(MAX_MANIFEST_BYTES + 1), "<stdin>"
        else:
            try:
                with Path(path).open("rb") as file:
                    data, source = file.read(MAX_MANIFEST_BYTES + 1), path
            except OSError as exc:
                raise CliError(f"error: the path {path!r} cannot be read: {exc.strerror}") from exc
        try:
            documents += load_documents(decode_manifest(data, source=source), source=source)
        except ObjectsError as exc:
            raise CliError(f"error: {exc}") from exc
    if not documents:
        raise CliError("error: no objects passed to apply")
    return documents


def _describe(result: dict[str, Any]) -> str:
    kind = KINDS[result["kind"]]
    return f"{kind.qualified}/{result['name']} {result['action']}"


def _run(args: argparse.Namespace, action: Any) -> int:
    try:
        backend = _backend(args)
    except (StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        return int(action(backend))
    except CliError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        backend.close()


def _in_namespace(documents: list[dict[str, Any]], namespace: str | None) -> list[dict[str, Any]]:
    """kubectl's ``-n``: the namespace of namespaced objects that name none; an object
    that names another is an error, not silently moved; cluster-scoped ones ignore it."""
    if not namespace:
        return documents
    for document in documents:
        kind_name = document.get("kind")
        kind = KINDS.get(kind_name) if isinstance(kind_name, str) else None
        if kind is None or not kind.namespaced:
            continue
        meta = document.setdefault("metadata", {})
        if not isinstance(meta, dict):
            continue
        given = meta.get("namespace")
        if given and given != namespace:
            raise CliError(
                f'error: the namespace from the provided object "{given}" does not match the'
                f" namespace \"{namespace}\". You must pass '--namespace={given}' to perform"
                " this operation."
            )
        meta["namespace"] = namespace
    return documents


def apply(args: argparse.Namespace) -> int:
    def run(backend: Backend) -> int:
        for result in backend.apply(_in_namespace(_read(args.filename), args.namespace)):
            print(_describe(result))
        return 0

    return _run(args, run)


def delete(args: argparse.Namespace) -> int:
    def run(backend: Backend) -> int:
        if args.filename:
            if args.kind:
                raise CliError("error: give either -f FILE or KIND NAME, not both")
            documents = _in_namespace(_read(args.filename), args.namespace)
        else:
            if not args.kind or not args.name:
                raise CliError(
                    "error: give KIND NAME (e.g. delete netpol deny-all -n x) or -f FILE"
                )
            kind = _kind(args.kind)
            documents = [
                {
                    "apiVersion": kind.api_version,
                    "kind": kind.name,
                    "metadata": {
                        "name": args.name,
                        "namespace": args.namespace or DEFAULT_NAMESPACE,
                    },
                }
            ]
        for result in backend.delete(documents, ignore_missing=args.ignore_not_found):
            print(_describe(result))
        return 0

    return _run(args, run)


def _kind(name: str) -> Kind:
    try:
        return resolve_kind(name)
    except ObjectsError as exc:
        raise CliError(f"error: {exc}") from exc


def get(args: argparse.Namespace) -> int:
    def run(backend: Backend) -> int:
        kind = _kind(args.kind)
        namespace = None if args.all_namespaces else (args.namespace or DEFAULT_NAMESPACE)
        if args.name:
            items = [backend.get(kind, name=args.name, namespace=namespace)]
        else:
            items = backend.list(kind, namespace=namespace if kind.namespaced else None)
        single = args.name is not None
        if args.output in ("json", "yaml"):
            data: Any = items[0] if single else {"apiVersion": "v1", "kind": "List", "items": items}
            if args.output == "json":
                print(json.dumps(data, indent=2, sort_keys=True))
            else:
                print(yaml.safe_dump(data, sort_keys=False), end="")
            return 0
        if not items:
            where = f" in {namespace} namespace" if kind.namespaced and namespace else ""
            print(f"No resources found{where}.", file=sys.stderr)
            return 0
        _print_table(kind, items, with_namespace=args.all_namespaces and kind.namespaced)
        return 0

    return _run(args, run)


def _summary(kind: Kind, obj: dict[str, Any]) -> list[str]:
    meta = obj["metadata"]
    labels = ",".join(f"{k}={v}" for k, v in sorted((meta.get("labels") or {}).items()))
    if kind.name == "Pod":
        return [obj.get("status", {}).get("podIP", "<none>"), labels or "<none>"]
    if kind.name == "NetworkPolicy":
        selector = obj["spec"].get("podSelector") or {}
        shown = ",".join(f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items()))
        return [
            shown or ("<none>" if not selector else "<expressions>"),
            ",".join(obj["spec"]["policyTypes"]),
        ]
    if kind.name == "Namespace":
        return [labels]
    if kind.name == "Service":
        return _service_columns(obj)
    if kind.name == "EndpointSlice":
        return _slice_columns(obj)
    return [str(len(obj.get("specs") or []) + (1 if obj.get("spec") else 0))]


def _service_columns(obj: dict[str, Any]) -> list[str]:
    """kubectl's TYPE, CLUSTER-IP, EXTERNAL-IP, PORT(S), SELECTOR."""
    spec = obj["spec"]
    external = list(spec.get("externalIPs") or [])
    if spec["type"] == "LoadBalancer":
        ingress = (obj.get("status") or {}).get("loadBalancer", {}).get("ingress") or []
        external = [i.get("ip") or i.get("hostname") for i in ingress] + external
        shown_external = ",".join(external) or "<pending>"
    elif spec["type"] == "ExternalName":
        shown_external = spec.get("externalName") or "<none>"  # the alias, as kubectl shows it
    else:
        shown_external = ",".join(external) or "<none>"
    ports = ",".join(
        f"{p['port']}:{p['nodePort']}/{p['protocol']}"
        if p.get("nodePort")
        else f"{p['port']}/{p['protocol']}"
        for p in spec.get("ports") or []
    )
    selector = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items()))
    return [
        spec["type"],
        spec.get("clusterIP") or "<none>",
        shown_external,
        ports or "<none>",
        selector or "<none>",
    ]


def _slice_columns(obj: dict[str, Any]) -> list[str]:
    """kubectl's ADDRESSTYPE, PORTS, ENDPOINTS (three addresses, then how many more)."""
    ports = ",".join(str(p["port"]) if p.get("port") else "<unset>" for p in obj.get("ports") or [])
    addresses = [a for e in obj.get("endpoints") or [] for a in e.get("addresses") or []]
    shown = ",".join(addresses[:3])
    if len(addresses) > 3:
        shown += f" + {len(addresses) - 3} more..."
    return [obj.get("addressType", ""), ports or "<unset>", shown or "<unset>"]


_COLUMNS = {
    "Pod": ["IP", "LABELS"],
    "NetworkPolicy": ["POD-SELECTOR", "POLICY-TYPES"],
    "Namespace": ["LABELS"],
    "CiliumNetworkPolicy": ["RULES"],
    "CiliumClusterwideNetworkPolicy": ["RULES"],
    "Service": ["TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "SELECTOR"],
    "EndpointSlice": ["ADDRESSTYPE", "PORTS", "ENDPOINTS"],
}


def _print_table(kind: Kind, items: list[dict[str, Any]], *, with_namespace: bool) -> None:
    header = (["NAMESPACE"] if with_namespace else []) + ["NAME", *_COLUMNS[kind.name]]
    rows = [
        ([item["metadata"].get("namespace", "")] if with_namespace else [])
        + [item["metadata"]["name"], *_summary(kind, item)]
        for item in items
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def policy_trace(args: argparse.Namespace) -> int:
    def run(backend: Backend) -> int:
        try:
            protocol, port = parse_port(args.dport)
        except ValueError as exc:
            raise CliError(f"error: --dport {exc}") from exc
        if isinstance(backend, AgentBackend):
            # The agent knows the real identities and addresses: it traces.
            answer = backend.trace(src=args.src, dst=args.dst, protocol=protocol, port=port)
            if args.output == "json":
                print(json.dumps({k: answer[k] for k in ("allowed", "verdicts")}, indent=2))
            else:
                print(f"{args.src} -> {args.dst} {args.dport}")
                for line in answer["lines"]:
                    print(f"  {line}")
            return 0
        # Straight from etcd: from the objects alone (identities numbered here,
        # addresses from status.podIP).
        snapshot = {name: backend.list(kind, namespace=None) for name, kind in KINDS.items()}
        inp = input_from_objects(snapshot)
        pods = {pod.ref: pod for pod in inp.pods}
        ends = []
        for flag, ref in (("--src", args.src), ("--dst", args.dst)):
            if ref.count("/") != 1:
                raise CliError(f"error: {flag} {ref!r} is not NAMESPACE/POD")
            if ref not in pods:
                raise CliError(f"error: {flag}: pod {ref} not found (apply its Pod object first)")
            ends.append(pods[ref])
        result = compute(inp, local=[args.src, args.dst])
        ipcache = Ipcache.build(pods=inp.pods, result=result)
        outcome = trace(
            result, src=ends[0], dst=ends[1], protocol=protocol, port=port, ipcache=ipcache
        )
        if args.output == "json":
            print(
                json.dumps(
                    {
                        "allowed": outcome.allowed,
                        "verdicts": [
                            {
                                "direction": v.direction,
                                "endpoint": v.endpoint,
                                "allowed": v.allowed,
                                "peer_identity": v.peer_identity,
                                "because": v.because,
                            }
                            for v in outcome.verdicts
                        ],
                    },
                    indent=2,
                )
            )
        else:
            print(f"{args.src} -> {args.dst} {args.dport}")
            for line in outcome.lines():
                print(f"  {line}")
        return 0

    return _run(args, run)


def target_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--socket", default=str(DEFAULT_SOCKET), help="one node: the agent's API socket"
    )
    where.add_argument(
        "--etcd-endpoint", metavar="URL", help="a cluster: its etcd (every agent watches it)"
    )
    return parser


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = target_options(sub.add_parser("apply", help="create or update objects from YAML/JSON"))
    p.add_argument(
        "-f", "--filename", action="append", required=True, help="a file, or - for stdin"
    )
    p.add_argument("-n", "--namespace", help="for namespaced objects that name none")
    p.set_defaults(func=apply)

    p = target_options(sub.add_parser("get", help="show objects"))
    p.add_argument(
        "kind",
        help="pod, namespace, networkpolicy (netpol), cnp, ccnp, service (svc), endpointslice",
    )
    p.add_argument("name", nargs="?")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace")
    scope.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    p.set_defaults(func=get)

    p = target_options(sub.add_parser("delete", help="delete objects (by file, or KIND NAME)"))
    p.add_argument("kind", nargs="?")
    p.add_argument("name", nargs="?")
    p.add_argument("-f", "--filename", action="append")
    p.add_argument("-n", "--namespace")
    p.add_argument("--ignore-not-found", action="store_true")
    p.set_defaults(func=delete)

    policy = sub.add_parser("policy", help="network policy").add_subparsers(
        dest="policy_command", required=True
    )
    p = target_options(policy.add_parser("trace", help="would a connection be allowed, and why"))
    p.add_argument("--src", required=True, metavar="NS/POD")
    p.add_argument("--dst", required=True, metavar="NS/POD")
    p.add_argument("--dport", required=True, metavar="PORT/PROTO", help="e.g. 80/tcp, 53/udp")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.set_defaults(func=policy_trace)

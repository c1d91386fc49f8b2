"""The agent's API for cluster objects on one node (``ciliate apply/get/delete
--socket``): Kubernetes-shaped objects kept in the agent's own store.

Errors answer as the API server would: 422 for an invalid object (the detail
names every field), 404 for an unknown kind, a missing object or namespace,
403 for what is forbidden (deleting ``default``), 500 for a full ClusterIP or
NodePort range (a condition of the cluster, not of the object) or a store holding
what it should not, 503 for a store that cannot be reached, 400 for input that is
not objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import Field

from ciliate.control.agent.schema import ApiModel, errors
from ciliate.control.objects import (
    ForbiddenError,
    NamespaceNotFoundError,
    ObjectInvalidError,
    ObjectNotFoundError,
    ObjectsError,
    ObjectStore,
    RangeFullError,
    UnknownKindError,
    resolve_kind,
)
from ciliate.control.store import Store, StoreError, StoreUnavailableError

__all__ = ["ApplyRequest", "DeleteRequest", "create_router"]


class ApplyRequest(ApiModel):
    objects: list[dict[str, Any]] = Field(description="Kubernetes objects, as in a manifest")


class DeleteRequest(ApiModel):
    objects: list[dict[str, Any]] = Field(
        description="the objects to delete (kind, apiVersion, metadata name/namespace are read)"
    )
    ignore_missing: bool = Field(default=False, description="a missing object is not an error")


_ANSWERS = errors(
    {
        400: "The input is not Kubernetes objects",
        403: "Forbidden, such as deleting an immortal namespace",
        404: "Unknown kind, or a missing object or namespace",
        422: "An object is invalid; the detail names each field",
        500: "No ClusterIP or NodePort left in the range, or a damaged store",
        503: "The store cannot be reached",
    }
)


def _status(exc: ObjectsError) -> int:
    if isinstance(exc, ObjectInvalidError):
        return 422
    if isinstance(exc, UnknownKindError | ObjectNotFoundError | NamespaceNotFoundError):
        return 404
    if isinstance(exc, ForbiddenError):
        return 403
    if isinstance(exc, RangeFullError):
        return 500
    return 400


def _refused(exc: ObjectsError | UnicodeEncodeError | StoreError) -> HTTPException:
    if isinstance(exc, UnicodeEncodeError):
        return HTTPException(
            status_code=422, detail=f"an object holds text that is not valid Unicode: {exc}"
        )
    if isinstance(exc, StoreError):
        # Nothing was written (the transaction rolled back); say which store and why.
        status = 503 if isinstance(exc, StoreUnavailableError) else 500
        return HTTPException(status_code=status, detail=f"the node's object store: {exc}")
    return HTTPException(status_code=_status(exc), detail=str(exc))


def create_router(store: Store, *, changed: Callable[[], None] = lambda: None) -> APIRouter:
    """The routes, over the agent's store; ``changed`` is called after every write
    (the policy loop passes at once instead of at its next poll)."""
    objects = ObjectStore(store)
    router = APIRouter(prefix="/v1/objects", tags=["objects"])

    @router.post("/apply", responses=_ANSWERS)
    def apply(body: ApplyRequest) -> dict[str, Any]:
        """Create or replace the objects, all or nothing (``ciliate apply -f``)."""
        try:
            results = objects.apply(body.objects)
        except (ObjectsError, UnicodeEncodeError, StoreError) as exc:
            raise _refused(exc) from exc
        changed()
        return {"results": [r.to_json() for r in results]}

    @router.post("/delete", responses=_ANSWERS)
    def delete_objects(body: DeleteRequest) -> dict[str, Any]:
        """Delete the objects a manifest names (``ciliate delete -f``)."""
        try:
            results = objects.delete(
                objects.refs_of(body.objects), ignore_missing=body.ignore_missing
            )
        except (ObjectsError, StoreError) as exc:
            raise _refused(exc) from exc
        changed()
        return {"results": [r.to_json() for r in results]}

    @router.get("/{kind}", responses=_ANSWERS)
    def list_objects(kind: str, namespace: str | None = None) -> dict[str, Any]:
        """Every object of a kind (``namespace`` narrows namespaced kinds)."""
        try:
            return {"items": objects.list(resolve_kind(kind), namespace=namespace)}
        except (ObjectsError, StoreError) as exc:
            raise _refused(exc) from exc

    @router.get("/{kind}/{name}", responses=_ANSWERS)
    def get_object(kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        try:
            return objects.get(resolve_kind(kind), name=name, namespace=namespace)
        except (ObjectsError, StoreError) as exc:
            raise _refused(exc) from exc

    @router.delete("/{kind}/{name}", responses=_ANSWERS)
    def delete_object(kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        try:
            found = resolve_kind(kind)
            ref = objects.refs_of(
                [
                    {
                        "apiVersion": found.api_version,
                        "kind": found.name,
                        "metadata": {"name": name, "namespace": namespace},
                    }
                ]
            )
            results = objects.delete(ref)
            changed()
            return {"results": [r.to_json() for r in results]}
        except (ObjectsError, StoreError) as exc:
            raise _refused(exc) from exc

    return router

"""Reading objects as ``kubectl apply -f`` does: YAML or JSON, several documents
(``---``), a ``List`` (``kind: List``, or any ``...List`` with ``items``), empty
documents skipped.

Input from an unlucky operator is refused with a clear error, never half read:

* more than 3 MiB (the API server's request limit) is refused before parsing;
* bytes that are not UTF-8 are refused naming the offset (:func:`decode_manifest`);
* a key given twice in one mapping is an error, as kubectl's strict decoding makes
  it, instead of the last one silently winning;
* YAML aliases that would expand a document past a bound (the "billion laughs") are
  refused, as go-yaml refuses "excessive aliasing"; a recursive alias too;
* nesting too deep for the parser is an error, not a crash.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from ciliate.control.objects.errors import DocumentError

__all__ = ["MAX_MANIFEST_BYTES", "decode_manifest", "load_documents"]

MAX_MANIFEST_BYTES = 3 * 1024 * 1024  # the API server's maxRequestBodyBytes
# Nodes a document may hold once its aliases are expanded: generous for any real
# manifest (a 3 MiB document has well under a million nodes), far below a bomb's.
MAX_EXPANDED_NODES = 1_000_000


def decode_manifest(data: bytes, *, source: str) -> str:
    """``data`` as text, or :class:`DocumentError` naming where it is not UTF-8."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise DocumentError(_too_large(source, len(data)))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(
            f"{source}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}):"
            " save the manifest as UTF-8"
        ) from exc


def _too_large(source: str, size: int) -> str:
    return (
        f"{source}: request entity too large: {size} bytes, the limit is"
        f" {MAX_MANIFEST_BYTES}: split the manifest"
    )


def load_documents(text: str, *, source: str = "<stdin>") -> list[dict[str, Any]]:
    """Every object in ``text`` in order, ``List`` items flattened."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_MANIFEST_BYTES:
        raise DocumentError(_too_large(source, len(text.encode("utf-8", "surrogatepass"))))
    try:
        if text.lstrip().startswith(("{", "[")):
            # JSON is YAML too, but json gives better positions for JSON input.
            loaded = json.loads(text, object_pairs_hook=_unique_keys)
            documents = loaded if isinstance(loaded, list) else [loaded]
        else:
            documents = _load_yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise DocumentError(f"{source}: not valid YAML or JSON: {exc}") from exc
    except _DuplicateKeyError as exc:
        raise DocumentError(f"{source}: {exc}: a key may appear once in a mapping") from exc
    except RecursionError as exc:
        raise DocumentError(f"{source}: the document is nested too deeply to read") from exc
    objects: list[dict[str, Any]] = []
    for number, document in enumerate(documents, start=1):
        if document is None:
            continue  # an empty document between two `---`
        if not isinstance(document, dict):
            raise DocumentError(
                f"{source}: document {number} is a {type(document).__name__}, not an object "
                "with apiVersion and kind"
            )
        if _is_list(document):
            items = document.get("items") or []
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise DocumentError(f"{source}: document {number}: List items must be objects")
            objects.extend(items)
            continue
        if "kind" not in document or "apiVersion" not in document:
            missing = "kind" if "kind" not in document else "apiVersion"
            raise DocumentError(f"{source}: document {number}: Object '{missing}' is missing")
        objects.append(document)
    return objects


class _DuplicateKeyError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(f'duplicate field "{key}"')
        out[key] = value
    return out


def _load_yaml(text: str) -> list[Any]:
    """``yaml.safe_load_all`` with the node graph checked before anything is built."""
    loader = yaml.SafeLoader(text)
    try:
        documents = []
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                break
            _check_node(node)
            documents.append(loader.construct_document(node))
        return documents
    finally:
        loader.dispose()


def _check_node(root: yaml.Node) -> None:
    """Refuse duplicate keys, recursive aliases and documents whose aliases expand
    past :data:`MAX_EXPANDED_NODES`. An alias is the same node object reached twice,
    so sizes are memoised per node: the check costs the size of the text, not of the
    expansion."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            raise yaml.YAMLError("document contains a recursive alias")
        visiting.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            seen: set[object] = set()
            for key_node, value_node in node.value:
                if (
                    isinstance(key_node, yaml.ScalarNode)
                    and key_node.tag != "tag:yaml.org,2002:merge"
                ):
                    if key_node.value in seen:
                        line = key_node.start_mark.line + 1
                        raise _DuplicateKeyError(
                            f'line {line}: key "{key_node.value}" already set in map'
                        )
                    seen.add(key_node.value)
                total += size(key_node) + size(value_node)
        visiting.discard(key)
        if total > MAX_EXPANDED_NODES:
            raise yaml.YAMLError(
                f"document contains excessive aliasing (more than {MAX_EXPANDED_NODES} nodes"
                " once expanded)"
            )
        sizes[key] = total
        return total

    size(root)


def _is_list(document: dict[str, Any]) -> bool:
    kind = document.get("kind")
    return isinstance(kind, str) and kind.endswith("List") and "items" in document

"""The building blocks every kind's validation shares: an error collector that
keeps going after a bad field (so one answer names every problem, as the API
server's does), and the API server's checks of names, labels, port names and
protocols."""

from __future__ import annotations

import re
from typing import Any

from ciliate.control.objects.errors import FieldError

__all__ = [
    "CILIUM_SOURCES",
    "DNS_LABEL",
    "DNS_SUBDOMAIN",
    "PORT_NAME",
    "PROTOCOLS",
    "QUALIFIED_NAME",
    "Errors",
    "check_name",
    "label_key_problem",
    "label_map",
    "label_value_problem",
    "port_name_problem",
    "protocol_of",
    "qualified_name_problem",
]

PROTOCOLS = ("TCP", "UDP", "SCTP")

# Cilium label sources a selector key may carry (``k8s:app``); a bare key means any.
CILIUM_SOURCES = ("k8s", "any", "reserved", "unspec", "container", "cidr")

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class Errors:
    """Collects field errors; each helper returns a usable default after an error,
    so one pass reports every problem, as the API server does."""

    def __init__(self) -> None:
        self.items: list[FieldError] = []

    def required(self, path: str, detail: str = "") -> None:
        self.items.append(FieldError(path, "Required value", detail))

    def invalid(self, path: str, value: object, detail: str) -> None:
        self.items.append(FieldError(path, "Invalid value", detail, value))

    def unsupported(self, path: str, value: object, supported: tuple[str, ...]) -> None:
        listed = ", ".join(f'"{s}"' for s in supported)
        self.items.append(
            FieldError(path, "Unsupported value", f"supported values: {listed}", value)
        )

    def forbidden(self, path: str, detail: str) -> None:
        self.items.append(FieldError(path, "Forbidden", detail))

    def duplicate(self, path: str, value: object) -> None:
        self.items.append(FieldError(path, "Duplicate value", "may not be repeated", value))

    def unknown_fields(self, path: str, raw: dict[str, Any], allowed: set[str]) -> None:
        for key in sorted(set(raw) - allowed):
            where = f"{path}.{key}" if path else key
            self.items.append(FieldError(where, "Forbidden", f'unknown field "{key}"'))

    def mapping(self, path: str, value: object, *, required: bool = False) -> dict[str, Any]:
        if value is None:
            if required:
                self.required(path)
            return {}
        if not isinstance(value, dict):
            self.invalid(path, value, "must be an object")
            return {}
        return value

    def sequence(self, path: str, value: object) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.invalid(path, value, "must be a list")
            return []
        return value

    def string(self, path: str, value: object, *, required: bool = False) -> str | None:
        if value is None:
            if required:
                self.required(path)
            return None
        if not isinstance(value, str):
            self.invalid(path, value, "must be a string")
            return None
        return value

    def integer(self, path: str, value: object) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.invalid(path, value, "must be an integer")
            return None
        return value


def check_name(errs: Errors, path: str, name: str, *, dns_label: bool) -> None:
    if not name:
        errs.required(path, "name or generateName is required")
        return
    if dns_label:
        if len(name) > 63 or not DNS_LABEL.fullmatch(name):
            errs.invalid(
                path,
                name,
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters"
                " or '-', and must start and end with an alphanumeric character"
                " (at most 63 characters)",
            )
    elif len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name):
        errs.invalid(
            path,
            name,
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric"
            " characters, '-' or '.', and must start and end with an alphanumeric character",
        )


def qualified_name_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not DNS_SUBDOMAIN.fullmatch(prefix)):
        return "prefix part must be a lowercase RFC 1123 subdomain"
    if not name:
        return "name part must be non-empty"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not QUALIFIED_NAME.fullmatch(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must"
            " start and end with an alphanumeric character"
        )
    return None


def label_value_problem(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if value and not QUALIFIED_NAME.fullmatch(value):
        return (
            "a valid label must be an empty string or consist of alphanumeric characters,"
            " '-', '_' or '.', and must start and end with an alphanumeric character"
        )
    return None


def label_key_problem(key: str, *, cilium: bool) -> str | None:
    if cilium:
        source, colon, rest = key.partition(":")
        if colon and source in CILIUM_SOURCES:
            if source == "reserved" and rest:
                return None  # reserved:host, reserved:world ...
            key = rest
    return qualified_name_problem(key)


def label_map(errs: Errors, path: str, raw: object, *, cilium: bool = False) -> dict[str, str]:
    labels: dict[str, str] = {}
    for key, value in errs.mapping(path, raw).items():
        problem = label_key_problem(key, cilium=cilium) if isinstance(key, str) else "not a string"
        if problem:
            errs.invalid(f"{path}", key, problem)
            continue
        if value is None:
            value = ""
        if not isinstance(value, str):
            errs.invalid(f"{path}[{key}]", value, "must be a string")
            continue
        if (problem := label_value_problem(value)) is not None:
            errs.invalid(f"{path}[{key}]", value, problem)
            continue
        labels[key] = value
    return labels


def port_name_problem(name: str) -> str | None:
    if len(name) > 15:
        return "must be no more than 15 characters"
    if not PORT_NAME.fullmatch(name):
        return "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)"
    if "--" in name:
        return "must not contain consecutive hyphens"
    if not re.search(r"[a-z]", name):
        return "must contain at least one letter (a-z)"
    return None


def protocol_of(
    errs: Errors, path: str, raw: object, *, allowed: tuple[str, ...], default: str
) -> str:
    value = errs.string(path, raw)
    if value is None:
        return default
    if value not in allowed:
        errs.unsupported(path, value, allowed)
        return default
    return value


# -- Namespace, Pod --------------------------------------------------------------

"""The building blocks every kind's validation shares: an error collector that
keeps going after a bad field (so one answer names every problem, as the API
server's does), and the API server's checks of names, labels, port names and
protocols."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from ciliate.control.objects.errors import FieldError

__all__ = [
    "CIDR_EXAMPLE",
    "CILIUM_SOURCES",
    "DNS_1035_LABEL",
    "DNS_LABEL",
    "DNS_SUBDOMAIN",
    "IP_EXAMPLE",
    "PROTOCOLS",
    "QUALIFIED_NAME",
    "Errors",
    "annotation_map",
    "check_name",
    "cidr_notation_ok",
    "dns_label_problems",
    "dns_subdomain_problems",
    "label_key_problems",
    "label_map",
    "label_value_problems",
    "port_name_problems",
    "protocol_of",
    "qualified_name_problems",
]

PROTOCOLS = ("TCP", "UDP", "SCTP")

# Cilium label sources a selector key may carry (``k8s:app``); a bare key means any.
CILIUM_SOURCES = ("k8s", "any", "reserved", "unspec", "container", "cidr")

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
# IsValidIP's and IsValidCIDR's words.
IP_EXAMPLE = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
CIDR_EXAMPLE = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"
# apimachinery's TotalAnnotationSizeLimitB: keys and values of one object together.
TOTAL_ANNOTATION_SIZE = 256 * 1024


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
        self.items.append(FieldError(path, "Duplicate value", "", value))  # as field.Duplicate

    def invalid_each(self, path: str, value: object, problems: list[str]) -> bool:
        """One Invalid value per message (upstream reports each); True if any."""
        for problem in problems:
            self.invalid(path, value, problem)
        return bool(problems)

    def too_many(self, path: str, count: int, most: int) -> None:
        """field.TooMany: ``path: Too many: 1001: must have at most 1000 items``."""
        self.items.append(FieldError(path, "Too many", f"{count}: must have at most {most} items"))

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


def _regex_error(message: str, pattern: str, *examples: str) -> str:
    """apimachinery's RegexError: the rule, examples, and the regex itself."""
    shown = ",  or ".join(f"'{e}'" for e in examples)
    return f"{message} (e.g. {shown}, regex used for validation is '{pattern}')"


_DNS_LABEL_RULE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-',"
    " and must start and end with an alphanumeric character"
)
_DNS_1035_RULE = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with"
    " an alphabetic character, and end with an alphanumeric character"
)
_DNS_SUBDOMAIN_RULE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-'"
    " or '.', and must start and end with an alphanumeric character"
)
_QUALIFIED_NAME_RULE = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with"
    " an alphanumeric character"
)
_LABEL_VALUE_RULE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_'"
    " or '.', and must start and end with an alphanumeric character"
)


def dns_label_problems(name: str, *, rfc1035: bool = False) -> list[str]:
    """``IsDNS1123Label`` (or ``IsDNS1035Label``): every message, as upstream lists them."""
    problems = []
    if len(name) > 63:
        problems.append("must be no more than 63 characters")
    if rfc1035:
        if not DNS_1035_LABEL.fullmatch(name):
            problems.append(
                _regex_error(_DNS_1035_RULE, DNS_1035_LABEL.pattern, "my-name", "abc-123")
            )
    elif not DNS_LABEL.fullmatch(name):
        if DNS_SUBDOMAIN.fullmatch(name):
            problems.append("must not contain dots")  # a subdomain, so only its dots are wrong
        else:
            problems.append(_regex_error(_DNS_LABEL_RULE, DNS_LABEL.pattern, "my-name", "123-abc"))
    return problems


def dns_subdomain_problems(name: str) -> list[str]:
    """``IsDNS1123Subdomain``."""
    problems = []
    if len(name) > 253:
        problems.append("must be no more than 253 characters")
    if not DNS_SUBDOMAIN.fullmatch(name):
        problems.append(_regex_error(_DNS_SUBDOMAIN_RULE, DNS_SUBDOMAIN.pattern, "example.com"))
    return problems


def check_name(
    errs: Errors, path: str, name: str, *, dns_label: bool, rfc1035: bool = False
) -> None:
    """A name as the API server checks it: ``dns_label`` for Namespaces (RFC 1123
    label), ``rfc1035`` for Services (must start with a letter), otherwise an RFC 1123
    subdomain (Pods, policies, EndpointSlices)."""
    if not name:
        errs.required(path, "name or generateName is required")
        return
    if dns_label or rfc1035:
        problems = dns_label_problems(name, rfc1035=rfc1035)
    else:
        problems = dns_subdomain_problems(name)
    errs.invalid_each(path, name, problems)


def cidr_notation_ok(text: str, *, bare_ip: bool = False) -> bool:
    """``address/length`` with a decimal length and no blanks, as Go's ParsePrefix
    reads it (Python would also take a netmask, ``10.0.0.0/255.0.0.0``, which the API
    server and Cilium refuse); ``bare_ip`` also takes an address alone."""
    address, slash, length = text.partition("/")
    if not address or address != address.strip():
        return False
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    if not slash:
        return bare_ip and network.prefixlen == network.max_prefixlen
    return length.isdigit() and length.isascii()


def qualified_name_problems(key: str) -> list[str]:
    """``IsQualifiedName``: an optional DNS subdomain prefix and ``/``, then a name."""
    parts = key.split("/")
    if len(parts) > 2:
        return [
            "a qualified name "
            + _regex_error(
                _QUALIFIED_NAME_RULE, QUALIFIED_NAME.pattern, "MyName", "my.name", "123-abc"
            )
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    problems = []
    name = parts[-1]
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix:
            problems.append("prefix part must be non-empty")
        else:
            problems += [f"prefix part {p}" for p in dns_subdomain_problems(prefix)]
    if not name:
        problems.append("name part must be non-empty")
    elif len(name) > 63:
        problems.append("name part must be no more than 63 characters")
    if not QUALIFIED_NAME.fullmatch(name):
        problems.append(
            "name part "
            + _regex_error(
                _QUALIFIED_NAME_RULE, QUALIFIED_NAME.pattern, "MyName", "my.name", "123-abc"
            )
        )
    return problems


def label_value_problems(value: str) -> list[str]:
    """``IsValidLabelValue``."""
    problems = []
    if len(value) > 63:
        problems.append("must be no more than 63 characters")
    if value and not QUALIFIED_NAME.fullmatch(value):
        problems.append(
            _regex_error(
                _LABEL_VALUE_RULE, f"({QUALIFIED_NAME.pattern})?", "MyValue", "my_value", "12345"
            )
        )
    return problems


def label_key_problems(key: str, *, cilium: bool) -> list[str]:
    """A label key (``ValidateLabelName``); Cilium selectors may prefix a source
    (``k8s:app``), and ``reserved:`` names a reserved label as it is."""
    if cilium:
        source, colon, rest = key.partition(":")
        if colon and source in CILIUM_SOURCES:
            if source == "reserved" and rest:
                return []  # reserved:host, reserved:world ...
            key = rest
    return qualified_name_problems(key)


def label_map(errs: Errors, path: str, raw: object, *, cilium: bool = False) -> dict[str, str]:
    """``ValidateLabels``: each key and each value checked, every error on the map's
    own path (as upstream names them), bad pairs left out of the result."""
    labels: dict[str, str] = {}
    for key, value in errs.mapping(path, raw).items():
        if not isinstance(key, str):
            errs.invalid(path, key, "a label key must be a string")
            continue
        bad = errs.invalid_each(path, key, label_key_problems(key, cilium=cilium))
        if value is None:
            value = ""
        if not isinstance(value, str):
            errs.invalid(path, value, f"the value of {key!r} must be a string")
            continue
        bad = errs.invalid_each(path, value, label_value_problems(value)) or bad
        if not bad:
            labels[key] = value
    return labels


def annotation_map(errs: Errors, path: str, raw: object) -> dict[str, str]:
    """``ValidateAnnotations``: qualified-name keys (compared lower-cased), string
    values, and at most 256 KiB of keys and values together."""
    annotations: dict[str, str] = {}
    total = 0
    for key, value in errs.mapping(path, raw).items():
        if not isinstance(key, str):
            errs.invalid(path, key, "an annotation key must be a string")
            continue
        if errs.invalid_each(path, key, qualified_name_problems(key.lower())):
            continue
        if value is None:
            value = ""
        if not isinstance(value, str):
            errs.invalid(path, value, f"the value of {key!r} must be a string")
            continue
        total += len(key.encode()) + len(value.encode())
        annotations[key] = value
    if total > TOTAL_ANNOTATION_SIZE:
        errs.items.append(
            FieldError(path, "Too long", f"may not be more than {TOTAL_ANNOTATION_SIZE} bytes")
        )
    return annotations


def port_name_problems(name: str) -> list[str]:
    """``IsValidPortName`` (an IANA service name): every message, as upstream lists them."""
    problems = []
    if len(name) > 15:
        problems.append("must be no more than 15 characters")
    if not re.fullmatch(r"[-a-z0-9]+", name):
        problems.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if not re.search(r"[a-z]", name):
        problems.append("must contain at least one letter (a-z)")
    if "--" in name:
        problems.append("must not contain consecutive hyphens")
    if name.startswith("-") or name.endswith("-"):
        problems.append("must not begin or end with a hyphen")
    return problems


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

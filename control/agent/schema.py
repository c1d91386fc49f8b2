"""What every model and route of the agent's API shares: strict request
models, text that is valid Unicode, and documented error answers.

- ``ApiModel`` validates strictly: a JSON ``"false"`` is not a boolean and
  ``"1"`` is not an integer (pydantic's lax mode would convert both, so a
  client's mistake would silently do something).
- ``Text`` is a ``str`` that can be encoded as UTF-8. JSON may carry a lone
  UTF-16 surrogate (``"\\ud800"``), which Python decodes into a ``str``
  that later fails wherever it is encoded; refused here, it is a 422
  naming the field instead of a 500 somewhere deeper.
- ``errors({...})`` declares the 4xx answers of a route in the OpenAPI
  document, with the body FastAPI sends for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict


class ApiModel(BaseModel):
    """Base of every request and response body of the API."""

    model_config = ConfigDict(strict=True)


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"not valid Unicode: a lone surrogate {text[exc.start]!a} at character {exc.start}"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class Problem(ApiModel):
    """The body of a refused request (FastAPI's ``HTTPException``)."""

    detail: str


def errors(described: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each 4xx it answers, with what it means
    there and the Problem body FastAPI sends."""
    return {code: {"model": Problem, "description": text} for code, text in described.items()}


def printable(value: Any) -> Any:
    """``value`` (a validation error list, say) with every string made
    encodable: a refused lone surrogate shows as ``\\udXXX`` text, so the
    answer that names it can itself be sent."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable(v) for v in value]
    return value

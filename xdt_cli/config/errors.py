"""The ground floor's errors and their text: `XdtError` and `ConfigError`, the one
did-you-mean helper, the one "first line of an exception" helper, and `error_lines`, which
turns a pydantic ValidationError into one line per problem naming the dotted key.

Every user-facing error of xdt derives from `XdtError`; the CLI turns one into exit code 2
and one line per problem on stderr, never a traceback (xdt_cli/errors.py adds the rest).
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ValidationError


class XdtError(Exception):
    """A problem with what the user gave us (config, argument, file, checkpoint).

    `lines` holds one message per problem; `str(err)` joins them.
    """

    def __init__(self, *lines: str) -> None:
        self.lines = [" ".join(str(line).split()) for line in lines if line]
        super().__init__("\n".join(self.lines))


class ConfigError(XdtError):
    """The config file, a `base:` config, or an override is invalid."""


def did_you_mean(word: str, choices: Iterable[str], *, prefix: str = "") -> str:
    """` (did you mean 'X'?)` for the closest of `choices` (`prefix` + X), or "": the one
    hint of every "unknown name" message (difflib's ratio of at least 0.6)."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def first_line(exc: BaseException, limit: int = 200, *, kind: bool = True) -> str:
    """The first line of an exception's message, cut at `limit` characters, for one-line
    errors: `Type: text` (or `text` without `kind`); the type's name when there is no text."""
    text = str(exc).strip()
    text = text.splitlines()[0][:limit] if text else ""
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}" if kind else text


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation may hold (through Optional, Union, Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _items_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models held as the values of a dict or the items of a list that an
    annotation may hold (`dict[str, TaskConfig]`, `list[TransformStep]`)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated or origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        return [m for arg in (args[:1] if origin is Annotated else args) for m in _items_in(arg)]
    if origin in (dict, list):
        return _models_in(typing.get_args(annotation)[-1])
    return []


def _walk(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], list[str]]:
    """Follow a pydantic error location through the schema.

    Returns the dotted path without union tags, and the field names valid at its last level.
    """
    models, path = [root], []
    items: list[type[BaseModel]] = []  # models behind a dict key or list index: next part
    for part in loc:
        if items:  # a key of a dict (a task's name) or a list index: no field of its own
            models, items = items, []
            path.append(str(part))
            continue
        tagged = [m for m in models if _tag_of(m) == part]
        if tagged:  # a discriminated-union tag, not a key the user wrote
            models = tagged
            continue
        path.append(str(part))
        nxt = []
        for model in models:
            field = model.model_fields.get(str(part))
            if field is not None:
                nxt.extend(_models_in(field.annotation))
                items.extend(_items_in(field.annotation))
        models = nxt
    return path, sorted({name for m in models for name in m.model_fields})


def _tag_of(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("name")
    if field is not None and typing.get_origin(field.annotation) is Literal:
        return typing.get_args(field.annotation)[0]
    return None


def error_lines(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            path, valid = _walk(root, loc[:-1])
            key = str(loc[-1])
            dotted = ".".join([*path, key])
            close = did_you_mean(key, valid)
            if close:
                close = close.replace("'", "'" + ".".join(path) + ".", 1) if path else close
            lines.append(f"{dotted}: unknown key{close}")
            continue
        path, _ = _walk(root, loc)
        dotted = ".".join(path) or "(top level)"
        msg = err["msg"]
        if err["type"] == "union_tag_invalid":
            tag = err["ctx"]["tag"]
            expected = [t.strip(" '") for t in err["ctx"]["expected_tags"].split(",")]
            dotted = ".".join([*path, "name"])
            msg = (
                f"unknown name '{tag}'{did_you_mean(tag, expected)}; "
                f"expected one of {', '.join(expected)}"
            )
        elif err["type"] in ("model_type", "dict_type", "model_attributes_type"):
            msg = f"expected a mapping of keys, got {err.get('input')!r}"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            if not path:
                lines.append(msg)
                continue
        elif "input" in err and err["type"] != "missing":
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{dotted}: {msg}")
    return lines

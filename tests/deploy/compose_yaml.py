"""Reading a compose file's text the way Compose does, for compose_model.py: YAML 1.2 scalars
(only true/false are booleans, ``22:22`` is a string and not a base-60 number, a leading 0 is
octal as in Go), a key given twice is an error, anchors and ``<<`` merges; then interpolation
of every value (not keys): ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
``${VAR:?error}``, ``${VAR?error}``, ``${VAR:+alt}``, ``${VAR+alt}`` (nested), ``$$`` for a
literal ``$``, and a ``$`` before anything else left as it is."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

Warn = Callable[[str], None]


class ComposeError(Exception):
    """The file is not a valid Compose project (or uses what this model does not cover)."""


class _Loader(yaml.SafeLoader):
    """YAML the way Compose's parser reads it: core-schema scalars, duplicate keys rejected."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # The first visit sees the keys as written; merges then add keys that may repeat.
        if id(node) not in self._checked:
            self._checked.add(id(node))
            seen: dict[str, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                    key_node, yaml.ScalarNode
                ):
                    continue
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f'mapping key "{key_node.value}" already defined at line '
                        f"{seen[key_node.value] + 1}",
                        key_node.start_mark,
                    )
                seen[key_node.value] = key_node.start_mark.line
        super().flatten_mapping(node)


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = str(loader.construct_scalar(node))  # type: ignore[arg-type]
    # Go's ParseInt(text, 0, 64), which Compose's parser uses: a leading 0 means octal.
    legacy_octal = re.fullmatch(r"([-+]?)0([0-7_]+)", text)
    return int(f"{legacy_octal[1]}0o{legacy_octal[2]}" if legacy_octal else text, 0)


_YAML11_ONLY = {"bool", "int", "float", "timestamp"}
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag.rsplit(":", 1)[-1] not in _YAML11_ONLY]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^[-+]?(?:0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+|0[0-7_]*|[1-9][0-9_]*)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load_yaml(path: Path) -> Any:
    """The document in ``path``, parsed as Compose parses it."""
    try:
        return yaml.load(path.read_text(), Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ComposeError(f"failed to parse {path}: {exc}") from exc


# -- interpolation ---------------------------------------------------------------------------

_NAME = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*")
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")


def interpolate(value: Any, env: Mapping[str, str], warn: Warn, path: str = "") -> Any:
    """``value`` with every string (not mapping keys) interpolated from ``env``, as a copy."""
    if isinstance(value, str):
        return _substitute(value, env, warn, path)
    if isinstance(value, dict):
        return {
            key: interpolate(item, env, warn, f"{path}.{key}" if path else str(key))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [interpolate(item, env, warn, f"{path}[{i}]") for i, item in enumerate(value)]
    return value


def _substitute(text: str, env: Mapping[str, str], warn: Warn, path: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
            continue
        following = text[i + 1 : i + 2]
        if following == "$":
            out.append("$")
            i += 2
        elif following == "{":
            i = _braced(text, i + 2, env, warn, path, out)
        elif name := _NAME.match(text, i + 1):
            out.append(_lookup(name.group(), env, warn))
            i = name.end()
        else:  # a lone `$` (before a digit, a space, the end) stays, as Compose leaves it
            out.append("$")
            i += 1
    return "".join(out)


def _braced(
    text: str, start: int, env: Mapping[str, str], warn: Warn, path: str, out: list[str]
) -> int:
    """Appends the value of the ``${...}`` opened before ``start``; returns the index after it."""
    invalid = ComposeError(
        f"invalid interpolation format for {path}: {text!r}; "
        "you may need to escape any $ with another $"
    )
    name = _NAME.match(text, start)
    if name is None:
        raise invalid
    i = name.end()
    if text[i : i + 1] == "}":
        out.append(_lookup(name.group(), env, warn))
        return i + 1
    operator = next((op for op in _OPERATORS if text.startswith(op, i)), None)
    if operator is None:
        raise invalid
    word_start = i = i + len(operator)
    depth = 1
    while i < len(text):
        if text.startswith("$$", i):
            i += 2
            continue
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                break
        i += 1
    else:
        raise invalid
    word = text[word_start:i]
    current = env.get(name.group())
    present = current is not None and (current != "" or not operator.startswith(":"))
    if operator.endswith("-"):
        out.append(current if present else _substitute(word, env, warn, path))  # type: ignore[arg-type]
    elif operator.endswith("+"):
        out.append(_substitute(word, env, warn, path) if present else "")
    elif not present:
        detail = _substitute(word, env, warn, path)
        raise ComposeError(
            f"error while interpolating {path}: required variable {name.group()} is missing a "
            f"value{': ' + detail if detail else ''}"
        )
    else:
        out.append(current)  # type: ignore[arg-type]
    return i + 1


def _lookup(name: str, env: Mapping[str, str], warn: Warn) -> str:
    if name not in env:
        warn(f'The "{name}" variable is not set. Defaulting to a blank string.')
        return ""
    return env[name]

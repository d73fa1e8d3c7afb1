"""An offline ``docker compose config`` for the deployment tests, used when no Docker Compose
plugin is installed (the plugin, when present, is the stronger check and is preferred).

It reads one compose file the way Compose does and returns (``load_project``) or prints
(``main``) the model in the shape ``docker compose config --format json`` gives, for the parts
our files and tests use. Checked against Compose 2.40 on deploy/compose*.yaml: equal output.

1. Parse and interpolate (compose_yaml.py): YAML 1.2 scalars, duplicate keys rejected, anchors
   and ``<<`` merges, ``${VAR...}`` forms and ``$$`` from the mapping given (the CLI passes its
   own environment; an unset variable warns and becomes empty).
2. Validate against ``schemas/compose.schema.json``: every service key of the Compose
   Specification with its type, unknown keys are errors (``x-*`` extensions allowed).
3. Select profiles (``*``: all), normalise: ``command``/``entrypoint`` strings shell-split,
   ``environment`` and ``build.args`` as mappings (bare names from the environment), ``build``
   context absolute, ``ports`` and ``volumes`` short syntax in long form (bind sources
   absolute, ``~`` from HOME), ``depends_on`` in long form with the dependencies that
   ``network_mode: service:X`` and ``volumes_from`` imply, durations (``stop_grace_period``,
   healthcheck) as Go prints them, ``shm_size`` in bytes, ``tmpfs``/``dns`` as lists,
   ``configs``/``secrets`` references in long form, the implicit ``default`` network, project
   names on networks/volumes/configs/secrets, the unused ones dropped.
4. The checks Compose makes on the project (compose_checks.py): references, cycles, ports;
   plus ours: no host port published twice.

Not covered, so rejected with a message rather than mis-modelled: ``extends``, ``include``,
``env_file``, ``label_file``, top-level or service ``models``, more than one ``-f`` file
(override merging). Not read: ``.env`` files, ``COMPOSE_*`` variables. Other keys pass through
as written after interpolation (``labels``, ``sysctls``, ``ulimits``, ``deploy`` without the
empty ``placement`` Compose adds...), without the string-to-bool/number casts Compose applies
to interpolated values. ``load_project`` holds the values a container receives (``$$`` read
as ``$``); the CLI prints ``$`` as ``$$``, as Compose does, so its output reads back the same.

Run as ``python -m tests.deploy.compose_model -f FILE [--profile P]... config [--quiet]
[--format json|yaml]`` from the repository root: exit status 1 and the errors on stderr when
the file is invalid.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tests.deploy.compose_checks import PortError, parse_ports, semantic_errors
from tests.deploy.compose_yaml import ComposeError, Warn, interpolate, load_yaml

SCHEMA = Path(__file__).parent / "schemas" / "compose.schema.json"
NOT_COVERED_TOP = ("include", "models")
NOT_COVERED_SERVICE = ("extends", "env_file", "label_file", "models")
Model = dict[str, Any]
__all__ = ["ComposeError", "byte_size", "go_duration", "load_project", "main", "schema_errors"]


# -- the model --------------------------------------------------------------------------------


def schema_errors(document: Any) -> list[str]:
    """What ``schemas/compose.schema.json`` rejects in an interpolated compose document."""
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    errors = []
    for error in validator.iter_errors(document):
        # A failed oneOf says little; the branch that got deepest says what is wrong.
        while error.context:
            error = max(error.context, key=lambda e: (len(e.absolute_path), e.validator != "type"))
        where = ".".join(map(str, error.absolute_path)) or "(top level)"
        errors.append(f"{where}: {_message(error)}")
    return sorted(errors)


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator != "additionalProperties" or not isinstance(error.instance, dict):
        return str(error.message)
    schema: Model = dict(error.schema)
    known, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
    extra = [
        repr(key)
        for key in error.instance
        if key not in known and not any(re.search(p, key) for p in patterns)
    ]
    return f"additional properties {', '.join(extra)} not allowed"


def load_project(
    path: Path,
    env: Mapping[str, str] | None = None,
    profiles: Collection[str] = ("*",),
    warn: Warn | None = None,
) -> Model:
    """The model of the compose file at ``path``, as ``docker compose -f PATH --profile ...
    config --format json`` prints it; raises ComposeError with every problem found."""
    env = dict(env or {})
    warn = warn or (lambda message: None)
    path = Path(path).absolute()
    document = load_yaml(path)
    if not isinstance(document, dict):
        raise ComposeError(f"{path}: a compose file is a mapping, not {type(document).__name__}")
    document = interpolate(document, env, warn)
    _reject_not_covered(document)
    if "version" in document:
        warn(f"{path}: the attribute `version` is obsolete, it will be ignored")
    errors = schema_errors(document)
    if errors:
        raise ComposeError(f"validating {path}:\n" + "\n".join(errors))
    model = _normalise(document, path.parent, env, profiles)
    errors = semantic_errors(model)
    if errors:
        raise ComposeError("invalid compose project:\n" + "\n".join(errors))
    return model


def _reject_not_covered(document: Model) -> None:
    found = [key for key in NOT_COVERED_TOP if key in document]
    services = document.get("services")
    for name, service in services.items() if isinstance(services, dict) else ():
        if isinstance(service, dict):
            found += [f"services.{name}.{key}" for key in NOT_COVERED_SERVICE if key in service]
    if found:
        raise ComposeError(
            f"{', '.join(found)}: valid Compose that tests/deploy/compose_model.py does not "
            "model; install the docker compose plugin to check this file"
        )


def _normalise(
    document: Model, base_dir: Path, env: Mapping[str, str], profiles: Collection[str]
) -> Model:
    name = str(document.get("name") or base_dir.name).lower()
    if "name" not in document:
        name = re.sub(r"[^a-z0-9_-]", "", name)
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        raise ComposeError(f"{name!r} is not a valid project name")
    model: Model = {"name": name}
    services = {}
    for service_name, service in sorted(document["services"].items()):
        if _enabled(service or {}, profiles):
            try:
                services[service_name] = _service(service or {}, base_dir, env)
            except (ComposeError, PortError) as exc:
                raise ComposeError(f"services.{service_name}: {exc}") from exc
    model["services"] = services
    # Like Compose, keep only the networks, volumes, configs and secrets a service uses.
    used = {
        "networks": {n for s in services.values() for n in s.get("networks") or {}},
        "volumes": {
            v["source"]
            for s in services.values()
            for v in s.get("volumes", [])
            if v["type"] == "volume" and "source" in v
        },
        "configs": {ref["source"] for s in services.values() for ref in s.get("configs", [])},
        "secrets": {ref["source"] for s in services.values() for ref in s.get("secrets", [])},
    }
    for kind, names in used.items():
        declared = {
            key: _named(value, name, key) for key, value in _items(document, kind) if key in names
        }
        if kind == "networks" and "default" in names:
            declared.setdefault("default", _named(None, name, "default"))
        for value in declared.values():
            if kind == "networks" and not value.get("external"):
                value.setdefault("ipam", {})
            if "file" in value:
                value["file"] = _host_path(value["file"], base_dir, env)
        if declared:
            model[kind] = declared
    model.update({key: value for key, value in document.items() if key.startswith("x-")})
    return model


def _items(document: Model, key: str) -> list[tuple[str, Any]]:
    return sorted((document.get(key) or {}).items())


def _named(declared: Model | None, project: str, key: str) -> Model:
    out = dict(declared or {})
    # An external object is looked up by its own name; ours are prefixed with the project's.
    out.setdefault("name", key if out.get("external") else f"{project}_{key}")
    return out


def _enabled(service: Model, profiles: Collection[str]) -> bool:
    wanted = service.get("profiles") or []
    return not wanted or "*" in profiles or bool(set(wanted) & set(profiles))


def _service(raw: Model, base_dir: Path, env: Mapping[str, str]) -> Model:
    service = dict(raw)
    for key in ("command", "entrypoint"):
        value = service.get(key)
        service[key] = shlex.split(value) if isinstance(value, str) else value
    if "environment" in service:
        service["environment"] = _environment(service["environment"], env)
    if "build" in service:
        service["build"] = _build(service["build"], base_dir, env)
    if "ports" in service:
        service["ports"] = parse_ports(service["ports"])
    if "volumes" in service:
        service["volumes"] = [_volume(v, base_dir, env) for v in service["volumes"]]
    for key in ("tmpfs", "dns", "dns_search"):
        if isinstance(service.get(key), str):
            service[key] = [service[key]]
    if "stop_grace_period" in service:
        service["stop_grace_period"] = go_duration(service["stop_grace_period"])
    if "healthcheck" in service:
        service["healthcheck"] = _healthcheck(service["healthcheck"])
    for kind in ("configs", "secrets"):
        if kind in service:
            service[kind] = [_file_ref(kind, ref) for ref in service[kind]]
    if "shm_size" in service:
        service["shm_size"] = str(byte_size(service["shm_size"]))
    service["depends_on"] = _depends_on(service)
    if not service["depends_on"]:
        del service["depends_on"]
    networks = service.get("networks")
    if isinstance(networks, list):
        service["networks"] = dict.fromkeys(networks)
    elif networks is None and "network_mode" not in service:
        service["networks"] = {"default": None}
    return service


def _environment(value: Model | list[str], env: Mapping[str, str]) -> dict[str, str | None]:
    """A list or mapping of variables as a mapping of strings; a name without a value takes
    the environment's (None when unset)."""
    pairs = value.items() if isinstance(value, dict) else (_split_pair(i) for i in value)
    return {key: env.get(key) if item is None else _scalar(item) for key, item in pairs}


def _scalar(value: object) -> str:
    """A YAML scalar as Compose turns it into a string (Go's formatting)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return str(value)


def _split_pair(item: str) -> tuple[str, str | None]:
    key, sep, value = item.partition("=")
    return key, value if sep else None


def _build(value: str | Model, base_dir: Path, env: Mapping[str, str]) -> Model:
    build: Model = {"context": value} if isinstance(value, str) else dict(value)
    context = str(build.get("context", "."))
    if "://" not in context and not context.startswith("git@"):
        context = os.path.normpath(base_dir / context)
    build["context"] = context
    build.setdefault("dockerfile", "Dockerfile")
    if "args" in build:
        args = _environment(build["args"], env)
        build["args"] = {key: value for key, value in args.items() if value is not None}
    return build


_VOLUME_MODES = {"ro", "rw", "z", "Z", "nocopy"}
_PROPAGATION = {"shared", "rshared", "slave", "rslave", "private", "rprivate"}


def _volume(value: str | Model, base_dir: Path, env: Mapping[str, str]) -> Model:
    if isinstance(value, dict):
        long_form = dict(value)
        if long_form["type"] == "bind" and "source" in long_form:
            long_form["source"] = _host_path(long_form["source"], base_dir, env)
        return long_form
    parts = value.split(":")
    if len(parts) == 1:
        return {"type": "volume", "target": value, "volume": {}}
    if len(parts) > 3 or not parts[0] or not parts[1]:
        raise ComposeError(f"invalid volume specification: {value!r}")
    source, target = parts[0], parts[1]
    modes = parts[2].split(",") if len(parts) == 3 else []
    unknown = [m for m in modes if m not in _VOLUME_MODES | _PROPAGATION]
    if unknown:
        raise ComposeError(f"invalid volume mode {unknown[0]!r} in {value!r}")
    is_bind = source.startswith((".", "/", "~"))
    volume: Model = {"type": "bind" if is_bind else "volume", "source": source, "target": target}
    if "ro" in modes:
        volume["read_only"] = True
    if is_bind:
        volume["source"] = _host_path(source, base_dir, env)
        bind: Model = {}
        for mode in modes:
            if mode in ("z", "Z"):
                bind["selinux"] = mode
            elif mode in _PROPAGATION:
                bind["propagation"] = mode
        volume["bind"] = bind | {"create_host_path": True}
    else:
        volume["volume"] = {"nocopy": True} if "nocopy" in modes else {}
    return volume


def _host_path(source: str, base_dir: Path, env: Mapping[str, str]) -> str:
    if source == "~" or source.startswith("~/"):
        home = env.get("HOME") or os.path.expanduser("~")
        source = home + source[1:]
    return os.path.normpath(base_dir / source)


def _file_ref(kind: str, ref: str | Model) -> Model:
    out = {"source": ref} if isinstance(ref, str) else dict(ref)
    if kind == "secrets":
        out.setdefault("target", f"/run/secrets/{out['source']}")
    return out


def _healthcheck(value: Model) -> Model:
    check = dict(value)
    if isinstance(check.get("test"), str):
        check["test"] = ["CMD-SHELL", check["test"]]
    for key in ("interval", "timeout", "start_period", "start_interval"):
        if key in check:
            check[key] = go_duration(check[key])
    return check


def _depends_on(service: Model) -> dict[str, Model]:
    declared = service.get("depends_on") or {}
    if isinstance(declared, list):
        declared = {name: {"condition": "service_started"} for name in declared}
    out = {
        name: {**spec, "required": spec.get("required", True)} for name, spec in declared.items()
    }
    network_mode = str(service.get("network_mode", ""))
    if network_mode.startswith("service:"):
        out.setdefault(
            network_mode.removeprefix("service:"),
            {"condition": "service_started", "restart": True, "required": True},
        )
    for source in service.get("volumes_from") or []:
        if not source.startswith("container:"):
            out.setdefault(source.split(":")[0], {"condition": "service_started", "required": True})
    return out


# -- units ------------------------------------------------------------------------------------

_DURATION_UNITS = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
    "d": 86400 * 10**9,
    "w": 7 * 86400 * 10**9,
}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h|d|w)")


def go_duration(text: str) -> str:
    """A Compose duration (``90s``, ``1m30s``, ``1d``) as Go's Duration.String() prints it."""
    sign, body = ("-", text[1:]) if text.startswith("-") else ("", text.removeprefix("+"))
    if body == "0":
        return "0s"
    nanos, end = 0, 0
    for match in _DURATION_PART.finditer(body):
        if match.start() != end:
            break
        number, unit = match.groups()
        whole, _, fraction = number.partition(".")
        scale = _DURATION_UNITS[unit]
        nanos += int(whole or 0) * scale + int(fraction or 0) * scale // 10 ** len(fraction)
        end = match.end()
    if end == 0 or end != len(body):
        raise ComposeError(f"invalid duration {text!r}")
    return sign + _format_nanos(nanos)


def _format_nanos(nanos: int) -> str:
    if nanos == 0:
        return "0s"
    if nanos < 10**9:
        unit, size = next(
            (u, s) for u, s in (("ms", 10**6), ("µs", 10**3), ("ns", 1)) if nanos >= s
        )
        return _decimal(nanos, size) + unit
    hours, rest = divmod(nanos, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    out = f"{hours}h" if hours else ""
    out += f"{minutes}m" if hours or minutes else ""
    return out + _decimal(rest, 10**9) + "s"


def _decimal(value: int, size: int) -> str:
    whole, fraction = divmod(value, size)
    digits = str(fraction).rjust(len(str(size)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


_BYTE_SIZE = re.compile(r"^(\d+(?:\.\d+)?) ?([kKmMgGtTpP])?[iI]?[bB]?$")


def byte_size(value: int | float | str) -> int:
    """A Compose size (``16gb``, ``512m``, ``1024``) in bytes (1024-based, as Compose counts)."""
    if isinstance(value, int | float):
        return int(value)
    match = _BYTE_SIZE.match(value)
    if match is None:
        raise ComposeError(f"invalid size {value!r}")
    power = " kmgtp".index((match.group(2) or " ").lower())
    return int(float(match.group(1)) * 1024**power)


# -- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``docker compose -f FILE [--profile P]... config [--quiet] [--format json|yaml]``."""
    parser = argparse.ArgumentParser(prog="compose_model", description=__doc__.split("\n")[0])
    parser.add_argument("-f", "--file", action="append", type=Path, required=True)
    parser.add_argument("--profile", action="append", default=[])
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="validate and print the model")
    config.add_argument("-q", "--quiet", action="store_true")
    config.add_argument("--format", choices=["json", "yaml"], default="yaml")
    args = parser.parse_args(argv)
    if len(args.file) != 1:
        print("compose_model reads one -f file (no override merging)", file=sys.stderr)
        return 1
    try:
        model = load_project(
            args.file[0],
            env=os.environ,
            profiles=args.profile,
            warn=lambda message: print(f"WARN {message}", file=sys.stderr),
        )
    except ComposeError as exc:
        print(exc, file=sys.stderr)
        return 1
    if not args.quiet:
        # Compose prints `$` as `$$`, so that its output reads back as the same model.
        model = _escape_dollars(model)
        if args.format == "json":
            print(json.dumps(model, indent=2, sort_keys=True, ensure_ascii=False))
        else:
            print(yaml.safe_dump(model, sort_keys=True, allow_unicode=True), end="")
    return 0


def _escape_dollars(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, dict):
        return {key: _escape_dollars(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escape_dollars(item) for item in value]
    return value


if __name__ == "__main__":
    sys.exit(main())

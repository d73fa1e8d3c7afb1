"""The checks Compose makes on a project once its file is valid, over the model in the shape
``docker compose config --format json`` prints (from the plugin or from compose_model.py), and
the parsing of ``ports`` short syntax into that shape.

Compose rejects: a service with neither image nor build, a ``depends_on``, ``network_mode:
service:X`` or ``volumes_from`` naming no service, a named volume, network, config or secret
that is not declared, ``network_mode`` together with ``networks``, a dependency cycle, a
malformed port. One check is ours, as Compose only finds it when containers start: no host
port (per protocol and address) published twice.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

Model = dict[str, Any]
_PROTOCOLS = ("tcp", "udp", "sctp")
_ANY_ADDRESS = ("", "0.0.0.0", "::")


class PortError(ValueError):
    """A ``ports`` entry Compose cannot parse."""


def semantic_errors(model: Mapping[str, Any]) -> list[str]:
    """What Compose (and our host-port check) rejects in a normalised project model."""
    services: Mapping[str, Model] = model.get("services") or {}
    errors: list[str] = []
    for name, service in services.items():
        errors += _reference_errors(name, service, model)
    errors += _cycles(services)
    errors += _host_port_clashes(services)
    return errors


def _reference_errors(name: str, service: Model, model: Mapping[str, Any]) -> list[str]:
    services = model.get("services") or {}
    errors = []
    if not service.get("image") and not service.get("build"):
        errors.append(f'service "{name}" has neither an image nor a build context specified')
    wanted = list(service.get("depends_on") or {})
    network_mode = str(service.get("network_mode") or "")
    if network_mode.startswith("service:"):
        wanted.append(network_mode.removeprefix("service:"))
    if network_mode and service.get("networks"):
        errors.append(f'service "{name}" declares both `network_mode` and `networks`')
    wanted += [
        source.split(":")[0]
        for source in service.get("volumes_from") or []
        if not source.startswith("container:")
    ]
    errors += [
        f'service "{name}" depends on undefined service "{other}"'
        for other in dict.fromkeys(wanted)
        if other not in services
    ]
    refs = {
        "network": list(service.get("networks") or {}),
        "volume": [
            v["source"]
            for v in service.get("volumes") or []
            if isinstance(v, dict) and v.get("type") == "volume" and v.get("source")
        ],
        "config": [_source(c) for c in service.get("configs") or []],
        "secret": [_source(s) for s in service.get("secrets") or []],
    }
    for kind, names in refs.items():
        declared = model.get(f"{kind}s") or {}
        errors += [
            f'service "{name}" refers to undefined {kind} "{ref}"'
            for ref in names
            if ref not in declared
        ]
    return errors


def _source(ref: str | Model) -> str:
    return ref if isinstance(ref, str) else str(ref.get("source"))


def _cycles(services: Mapping[str, Model]) -> list[str]:
    errors: list[str] = []
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = [*trail[trail.index(name) :], name]
            errors.append("dependency cycle detected: " + " -> ".join(cycle))
            return
        if name in done:
            return
        for other in services[name].get("depends_on") or {}:
            if other in services:
                visit(other, [*trail, name])
        done.add(name)

    for name in sorted(services):
        visit(name, [])
    return errors


def _host_port_clashes(services: Mapping[str, Model]) -> list[str]:
    bound: dict[tuple[str, str], list[tuple[str, str]]] = {}
    errors = []
    for name, service in sorted(services.items()):
        for port in service.get("ports") or []:
            published = str(port.get("published") or "")
            # A range lets the engine pick a free port in it: no fixed claim to compare.
            if not published or "-" in published:
                continue
            key = (published, str(port.get("protocol") or "tcp"))
            address = str(port.get("host_ip") or "")
            for other, other_address in bound.get(key, []):
                if address == other_address or {address, other_address} & set(_ANY_ADDRESS):
                    errors.append(
                        f'services "{other}" and "{name}" both publish host port '
                        f"{published}/{key[1]}"
                    )
            bound.setdefault(key, []).append((name, address))
    return errors


def parse_ports(entries: Sequence[int | float | str | Model]) -> list[Model]:
    """``ports`` entries in long form (a short entry with ranges gives one per port)."""
    out: list[Model] = []
    for entry in entries:
        if isinstance(entry, dict):
            out.append(_long_port(entry))
        else:
            out += _short_port(str(entry))
    return out


def _long_port(entry: Model) -> Model:
    port = {"mode": "ingress", "protocol": "tcp", **entry}
    port["target"] = _port_number(str(entry["target"]), "containerPort")
    if "published" in entry:
        port["published"] = str(entry["published"])
    if port["protocol"] not in _PROTOCOLS:
        raise PortError(f"invalid proto: {port['protocol']}")
    return port


def _short_port(spec: str) -> list[Model]:
    raw, _, protocol = spec.partition("/")
    protocol = protocol or "tcp"
    if protocol not in _PROTOCOLS:
        raise PortError(f"invalid proto: {protocol}")
    parts = raw.split(":")
    container = parts[-1]
    host = parts[-2] if len(parts) > 1 else ""
    address = ":".join(parts[:-2])
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    if address:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise PortError(f"invalid IP address: {address}") from None
    first, last = _port_range(container, "containerPort")
    host_first, host_last = _port_range(host, "hostPort") if host else (0, 0)
    if host and host_last - host_first != last - first and last != first:
        raise PortError(f"invalid ranges specified for container and host ports: {spec}")
    ports = []
    for offset, target in enumerate(range(first, last + 1)):
        port: Model = {"mode": "ingress", "target": target, "protocol": protocol}
        if address:
            port["host_ip"] = address
        if host and last != first:
            port["published"] = str(host_first + offset)
        elif host:
            port["published"] = host
        ports.append(port)
    return ports


def _port_range(text: str, what: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    start = _port_number(first, what)
    end = _port_number(last, what) if last else start
    if end < start:
        raise PortError(f"invalid {what}: {text}")
    return start, end


def _port_number(text: str, what: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise PortError(f"invalid {what}: {text}")
    return int(text)

"""The offline compose model reads files as Docker Compose 2.40 does (expected values below
were checked against `docker compose config`) and rejects what Compose rejects, so the compose
tests keep their strength on machines without the docker compose plugin."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.compose_model import (
    SCHEMA,
    ComposeError,
    byte_size,
    go_duration,
    load_project,
    main,
)
from tests.deploy.tools import REPO

ENV = {"A": "aval", "EMPTY": "", "HOME": "/home/dev"}
# The service keys of the Compose Specification (compose-spec as of Compose 2.40).
SERVICE_KEYS = """
annotations attach blkio_config build cap_add cap_drop cgroup cgroup_parent command configs
container_name cpu_count cpu_percent cpu_period cpu_quota cpu_rt_period cpu_rt_runtime
cpu_shares cpus cpuset credential_spec depends_on deploy develop device_cgroup_rules devices
dns dns_opt dns_search domainname entrypoint env_file environment expose extends
external_links extra_hosts gpus group_add healthcheck hostname image init ipc isolation
label_file labels links logging mac_address mem_limit mem_reservation mem_swappiness
memswap_limit models network_mode networks oom_kill_disable oom_score_adj pid pids_limit
platform ports post_start pre_stop privileged profiles provider pull_policy
pull_refresh_after read_only restart runtime scale secrets security_opt shm_size stdin_open
stop_grace_period stop_signal storage_opt sysctls tmpfs tty ulimits use_api_socket user
userns_mode uts volumes volumes_from working_dir
""".split()


def _load(tmp_path: Path, text: str, **kwargs: Any) -> dict[str, Any]:
    path = tmp_path / "compose.yaml"
    path.write_text(text)
    return load_project(path, env=kwargs.pop("env", ENV), **kwargs)


def _service(tmp_path: Path, body: str, top_level: str = "") -> dict[str, Any]:
    """The normalised service `a` whose keys (besides image) are `body`."""
    lines = "".join(f"    {line}\n" for line in body.split("\n"))
    text = f"services:\n  a:\n    image: x:1\n{lines}{top_level}"
    return dict(_load(tmp_path, text)["services"]["a"])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("${A}", "aval"),
        ("$A-$B.", "aval-."),
        ("${B}", ""),
        ("${B:-d}", "d"),
        ("${B-d}", "d"),
        ("${EMPTY:-d}", "d"),
        ("${EMPTY-d}", ""),
        ("${A:+alt}", "alt"),
        ("${B:+alt}", ""),
        ("${EMPTY+alt}", "alt"),
        ("${B:-${A}}", "aval"),
        ("${A:?oops}", "aval"),
        ("${EMPTY?set but empty is fine}", ""),
        ("'${B:-a b}'", "a b"),
        ("$$A", "$A"),
        ("${B:-$$A}", "$A"),
        ("a$1 b$ ${A}x", "a$1 b$ avalx"),
    ],
)
def test_interpolation_follows_compose(tmp_path: Path, value: str, expected: str) -> None:
    """Every ${VAR...} form, $$ and a lone $ resolve as in Compose."""
    assert _service(tmp_path, f"environment:\n  V: {value}")["environment"] == {"V": expected}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("${B:?must set B}", "required variable B is missing a value: must set B"),
        ("${EMPTY:?must}", "required variable EMPTY is missing a value: must"),
        ("${B?}", "required variable B is missing a value"),
        ("'${A'", "invalid interpolation format for services.a.environment.V"),
        ("${9}", "invalid interpolation format"),
        ("'${A B}'", "invalid interpolation format"),
    ],
)
def test_interpolation_errors_fail_the_file(tmp_path: Path, value: str, message: str) -> None:
    """A required variable that is missing, or a malformed ${...}, fails the file."""
    with pytest.raises(ComposeError, match=message.replace("$", r"\$")):
        _service(tmp_path, f"environment:\n  V: {value}")


def test_unset_variables_warn(tmp_path: Path) -> None:
    """An unset variable without a default warns, once per use, and becomes empty."""
    warnings: list[str] = []
    text = "services:\n  a:\n    image: x:${TAG}\n"
    model = _load(tmp_path, text, warn=warnings.append)
    assert model["services"]["a"]["image"] == "x:"
    assert warnings == ['The "TAG" variable is not set. Defaulting to a blank string.']


def test_deploy_files_need_no_variables() -> None:
    """Every variable the deploy compose files use has a default: a bare environment warns
    of nothing."""
    warnings: list[str] = []
    for name in ("compose.yaml", "compose.gpu.yaml"):
        load_project(REPO / "deploy" / name, env={}, warn=warnings.append)
    assert warnings == []


def test_yaml_is_read_as_compose_reads_it(tmp_path: Path) -> None:
    """YAML 1.2 scalars: `22:22` is a port, `yes` a string, `010` octal; merges override."""
    text = (
        "x-base: &base\n  image: x:1\n  restart: always\n"
        "services:\n  a:\n    <<: *base\n    restart: 'no'\n    ports: [22:22]\n"
        "    environment: {V: yes, O: 010, H: 0x1F, F: 1.0, T: true}\n"
    )
    service = _load(tmp_path, text)["services"]["a"]
    assert service["restart"] == "no"
    assert service["ports"][0]["published"] == "22"
    assert service["environment"] == {"V": "yes", "O": "8", "H": "31", "F": "1", "T": "true"}


def test_a_key_given_twice_fails(tmp_path: Path) -> None:
    """A service defined twice is an error, not a silent override."""
    with pytest.raises(ComposeError, match='mapping key "a" already defined'):
        _load(tmp_path, "services:\n  a:\n    image: x:1\n  a:\n    image: x:2\n")


def test_short_syntax_becomes_long_form(tmp_path: Path) -> None:
    """Commands, environment lists, ports and volumes take the long form Compose prints."""
    service = _service(
        tmp_path,
        'command: echo "hello world" $$HOME\n'
        "entrypoint: /bin/sh -c\n"
        "environment: [X=1, Y, Z=, A]\n"
        'ports: ["80", "8000-8001:9000-9001/udp", "127.0.0.1:5000:5000", "[::1]:9999:99",'
        " {target: 81, published: 8081}]\n"
        'volumes: ["data:/data:ro,nocopy", /anon, "~/h:/h", "./rel:/r:rw,z", "../up:/up"]',
        top_level="volumes:\n  data: {}\n",
    )
    assert service["command"] == ["echo", "hello world", "$HOME"]
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    assert service["environment"] == {"X": "1", "Y": None, "Z": "", "A": "aval"}
    tcp = {"mode": "ingress", "protocol": "tcp"}
    udp = {"mode": "ingress", "protocol": "udp"}
    assert service["ports"] == [
        {**tcp, "target": 80},
        {**udp, "target": 9000, "published": "8000"},
        {**udp, "target": 9001, "published": "8001"},
        {**tcp, "target": 5000, "published": "5000", "host_ip": "127.0.0.1"},
        {**tcp, "target": 99, "published": "9999", "host_ip": "::1"},
        {**tcp, "target": 81, "published": "8081"},
    ]
    bind = {"type": "bind", "bind": {"create_host_path": True}}
    assert service["volumes"] == [
        {
            "type": "volume",
            "source": "data",
            "target": "/data",
            "read_only": True,
            "volume": {"nocopy": True},
        },
        {"type": "volume", "target": "/anon", "volume": {}},
        {**bind, "source": "/home/dev/h", "target": "/h"},
        {
            "type": "bind",
            "source": str(tmp_path / "rel"),
            "target": "/r",
            "bind": {"selinux": "z", "create_host_path": True},
        },
        {**bind, "source": str(tmp_path.parent / "up"), "target": "/up"},
    ]


def test_dependencies_take_the_long_form(tmp_path: Path) -> None:
    """depends_on lists, network_mode: service:X and volumes_from all become long-form
    dependencies."""
    text = (
        "services:\n  a:\n    image: x:1\n  b:\n    image: x:1\n"
        "  c:\n    image: x:1\n    depends_on: [a]\n    network_mode: service:b\n"
        "    volumes_from: ['a:ro', 'container:other']\n"
    )
    service = _load(tmp_path, text)["services"]["c"]
    assert service["depends_on"] == {
        "a": {"condition": "service_started", "required": True},
        "b": {"condition": "service_started", "restart": True, "required": True},
    }
    assert "networks" not in service


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("35s", "35s"),
        ("60s", "1m0s"),
        ("90s", "1m30s"),
        ("1h", "1h0m0s"),
        ("1d2h", "26h0m0s"),
        ("500ms", "500ms"),
        ("1.5s", "1.5s"),
        ("1500ms", "1.5s"),
        ("0", "0s"),
    ],
)
def test_durations_print_as_go_does(text: str, expected: str) -> None:
    """Durations read as Compose reads them and print as `docker compose config` does."""
    assert go_duration(text) == expected


def test_sizes_are_bytes() -> None:
    """shm_size and the like count 1024-based units, as Compose does."""
    assert [byte_size(v) for v in ("16gb", "1g", "512m", "2k", 512)] == [
        16 * 1024**3,
        1024**3,
        512 * 1024**2,
        2048,
        512,
    ]
    with pytest.raises(ComposeError):
        byte_size("16 gigabytes")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("restrat: always", "services.a: additional properties 'restrat' not allowed"),
        ("healthcheck: {test: [CMD, ping], intervall: 5s}", "'intervall' not allowed"),
        ("read_only: 1", "services.a.read_only: 1 is not of type"),
        ("stop_grace_period: 10", "services.a.stop_grace_period: 10 is not of type 'string'"),
        ("stop_grace_period: 35 s", "services.a.stop_grace_period: '35 s' does not match"),
        ("ports: '80:80'", "services.a.ports: '80:80' is not of type 'array'"),
        ("depends_on: {b: {condition: started}}", "depends_on.b.condition: 'started' is not one"),
        (
            "deploy: {resources: {reservations: {devices: [{driver: nvidia}]}}}",
            "devices.0: 'capabilities' is a required property",
        ),
        ("extends: base", "does not model"),
        ("env_file: .env", "does not model"),
    ],
)
def test_schema_rejects_what_compose_rejects(tmp_path: Path, body: str, error: str) -> None:
    """Misspelt keys at any level, wrong types and bad values fail validation."""
    with pytest.raises(ComposeError) as raised:
        _service(tmp_path, body)
    assert error in str(raised.value)


def test_schema_knows_every_service_key(tmp_path: Path) -> None:
    """The schema accepts exactly the Compose Specification's service keys (and x-*), so a
    valid key never fails and a misspelt one always does."""
    service_schema = json.loads(SCHEMA.read_text())["$defs"]["service"]
    assert sorted(service_schema["properties"]) == sorted(SERVICE_KEYS)
    assert service_schema["additionalProperties"] is False
    assert _service(tmp_path, "x-note: anything")["x-note"] == "anything"


@pytest.mark.parametrize(
    ("services", "error"),
    [
        ("a: {image: x, depends_on: [b]}", 'service "a" depends on undefined service "b"'),
        ("a: {image: x, network_mode: 'service:b'}", 'depends on undefined service "b"'),
        ("a: {image: x, volumes_from: ['b:ro']}", 'depends on undefined service "b"'),
        ("a: {image: x, volumes: ['data:/data']}", 'refers to undefined volume "data"'),
        ("a: {image: x, networks: [front]}", 'refers to undefined network "front"'),
        ("a: {image: x, configs: [c1]}", 'refers to undefined config "c1"'),
        ("a: {image: x, secrets: [{source: s1}]}", 'refers to undefined secret "s1"'),
        ("a: {image: x, network_mode: host, networks: [default]}", "both `network_mode` and"),
        ("a: {restart: always}", "neither an image nor a build context"),
        (
            "a: {image: x, depends_on: [b]}\n  b: {image: x, depends_on: [a]}",
            "dependency cycle detected: a -> b -> a",
        ),
        (
            "a: {image: x, ports: ['8080:80']}\n  b: {image: x, ports: ['0.0.0.0:8080:81']}",
            'services "a" and "b" both publish host port 8080/tcp',
        ),
        ("a: {image: x, ports: [abc]}", "invalid containerPort: abc"),
        ("a: {image: x, ports: ['70000:80']}", "invalid hostPort: 70000"),
        ("a: {image: x, ports: ['80:80/xyz']}", "invalid proto: xyz"),
        ("a: {image: x, ports: ['80:80:80:80']}", "invalid IP address: 80:80"),
        ("a: {image: x, ports: ['8000-8002:9000-9001']}", "invalid ranges"),
        ("a: {image: x, volumes: ['./a:/a:rx']}", "invalid volume mode 'rx'"),
    ],
)
def test_project_checks_reject_broken_references(tmp_path: Path, services: str, error: str) -> None:
    """References to nothing, cycles, malformed or doubly published ports fail the file."""
    with pytest.raises(ComposeError) as raised:
        _load(tmp_path, f"services:\n  {services}\n")
    assert error in str(raised.value)


def test_host_ports_on_other_addresses_or_protocols_do_not_clash(tmp_path: Path) -> None:
    """One port number on two addresses, or over tcp and udp, is not a clash."""
    text = (
        "services:\n  a: {image: x, ports: ['127.0.0.1:8080:80', '53:53/udp']}\n"
        "  b: {image: x, ports: ['127.0.0.2:8080:80', '53:53/tcp']}\n"
    )
    assert set(_load(tmp_path, text)["services"]) == {"a", "b"}


def test_profiles_select_services(tmp_path: Path) -> None:
    """Without a profile, profiled services drop out (and depending on one fails); `*` keeps
    them all."""
    text = "services:\n  a: {image: x}\n  b: {image: x, profiles: [debug]}\n"
    assert set(_load(tmp_path, text, profiles=())["services"]) == {"a"}
    assert set(_load(tmp_path, text, profiles=("debug",))["services"]) == {"a", "b"}
    assert set(_load(tmp_path, text)["services"]) == {"a", "b"}
    with pytest.raises(ComposeError, match='undefined service "b"'):
        _load(
            tmp_path, text.replace("a: {image: x}", "a: {image: x, depends_on: [b]}"), profiles=()
        )


def test_cli_prints_like_compose_and_fails_on_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command line prints the JSON model ($ as $$, as Compose does) and exits 1 with the
    error on stderr for a bad file."""
    monkeypatch.setenv("TAG", "1.0")
    good = tmp_path / "good.yaml"
    good.write_text("services:\n  a:\n    image: x:${TAG}\n    command: echo $$HOME\n")
    assert main(["-f", str(good), "--profile", "*", "config", "--format", "json"]) == 0
    model = json.loads(capsys.readouterr().out)
    assert model["name"] == tmp_path.name.lower()
    assert model["services"]["a"]["image"] == "x:1.0"
    assert model["services"]["a"]["command"] == ["echo", "$$HOME"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  a:\n    image: x\n    restrat: always\n")
    assert main(["-f", str(bad), "config", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert (captured.out, "'restrat' not allowed" in captured.err) == ("", True)

"""The Dockerfiles pass hadolint and the house rules: base images pinned by tag (with the
digest to pin noted), multi-stage where something is built, a numeric non-root user, COPY
only, no compilers in the final image, exec-form entrypoints of console scripts that exist,
no HEALTHCHECK (Kubernetes probes), and a per-Dockerfile .dockerignore."""

from __future__ import annotations

import re
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.tools import REPO, hadolint

DEPLOY = REPO / "deploy"
DOCKERFILES = sorted(DEPLOY.glob("*.Dockerfile"))
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|cmake|rustc|cargo)\b")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]


def parse(text: str) -> list[Stage]:
    """Dockerfile text -> build stages (comments dropped, continuation lines joined)."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    stages: list[Stage] = []
    for line in lines:
        keyword, _, arguments = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = arguments.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name, []))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, arguments.strip()))
    return stages


def house_rule_violations(path: Path) -> list[str]:
    """What in this Dockerfile breaks the rules in this module's docstring."""
    text = path.read_text()
    stages = parse(text)
    problems: list[str] = []
    if not stages:
        return ["no FROM"]
    stage_names = {stage.name for stage in stages if stage.name}
    for stage in stages:
        if stage.base in stage_names:
            continue
        image, _, tag = stage.base.partition("@")[0].rpartition(":")
        if not image or not tag or tag == "latest" or "$" in stage.base:
            problems.append(f"base {stage.base!r} is not pinned by tag")
        elif f"{stage.base}@sha256:" not in text:
            problems.append(f"no note of the digest to pin for {stage.base}")
    final = stages[-1]
    if len(stages) > 1 and final.base in stage_names:
        problems.append("the final stage builds on a build stage")
    users = [i.arguments for i in final.instructions if i.keyword == "USER"]
    if not users or not re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]):
        problems.append(f"final stage must end as a numeric non-root USER, has {users}")
    for stage in stages:
        for instruction in stage.instructions:
            if instruction.keyword == "ADD":
                problems.append(f"ADD {instruction.arguments} (use COPY; never fetch URLs)")
            if instruction.keyword == "HEALTHCHECK":
                problems.append("HEALTHCHECK (Kubernetes probes the pods instead)")
    for instruction in final.instructions:
        if instruction.keyword == "RUN" and BUILD_TOOLS.search(instruction.arguments):
            problems.append(f"build tools in the final stage: {instruction.arguments}")
    entrypoints = [i.arguments for i in final.instructions if i.keyword == "ENTRYPOINT"]
    if not entrypoints or not entrypoints[-1].startswith("["):
        problems.append("ENTRYPOINT missing or not in exec form")
    return problems


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    """hadolint reports nothing at warning level or above."""
    result = subprocess.run(
        [hadolint(), "--config", str(DEPLOY / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_house_rules(dockerfile: Path) -> None:
    """Pinned bases, non-root numeric user, COPY only, no compilers or HEALTHCHECK, exec form."""
    assert house_rule_violations(dockerfile) == []


def test_the_linters_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    """A Dockerfile with an unpinned base, a fetched URL and root at the end fails both checks."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text(
        "FROM python:latest\n"
        "ADD https://example.com/tool.tar.gz /opt/\n"
        "RUN apt-get update && apt-get install -y gcc\n"
        "USER root\n"
        'ENTRYPOINT ["python"]\n'
    )
    problems = house_rule_violations(bad)
    assert any("not pinned" in p for p in problems)
    assert any(p.startswith("ADD") for p in problems)
    assert any("non-root" in p for p in problems)
    assert any("build tools" in p for p in problems)
    linted = subprocess.run(
        [hadolint(), "--config", str(DEPLOY / ".hadolint.yaml"), str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert linted.returncode != 0
    assert "DL3007" in linted.stdout  # "latest" tag


def test_the_images_are_the_documented_ones() -> None:
    """deploy/ builds the router, the simulator and the vLLM worker images."""
    assert [p.name for p in DOCKERFILES] == [
        "router.Dockerfile",
        "sim.Dockerfile",
        "worker-vllm.Dockerfile",
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_copy_what_exists_and_run_real_console_scripts(dockerfile: Path) -> None:
    """COPY sources exist in the repository, the entrypoint is one of the project's console
    scripts, and a .dockerignore beside the Dockerfile keeps .venv and .git out of the context."""
    stages = parse(dockerfile.read_text())
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for stage in stages:
        for instruction in stage.instructions:
            if instruction.keyword == "COPY" and "--from=" not in instruction.arguments:
                *sources, _ = instruction.arguments.split()
                for source in sources:
                    assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    entrypoint = [i.arguments for i in stages[-1].instructions if i.keyword == "ENTRYPOINT"][-1]
    assert entrypoint.strip('[]"').split('"')[0] in scripts
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :][:1] == ["*"], "the context starts from nothing"


def test_worker_image_matches_the_supported_vllm() -> None:
    """The worker image's vLLM tag is in the series pyproject's `vllm` extra allows."""
    base = parse((DEPLOY / "worker-vllm.Dockerfile").read_text())[0].base
    image, _, tag = base.rpartition(":")
    assert image == "vllm/vllm-openai"
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["vllm"][0]
    series = re.search(r">=(\d+\.\d+)", extra)
    assert series is not None
    assert tag.removeprefix("v").startswith(series.group(1) + ".")

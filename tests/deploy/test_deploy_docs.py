"""The deployment docs stay true to the files: every path they name exists, the images the
quick start builds are the ones the dev overlay runs, and the demo key works with the dev
Secret."""

from __future__ import annotations

import hashlib
import re

import pytest
import yaml

from tests.deploy.manifests import Obj, one
from tests.deploy.tools import REPO

DOCS = ["docs/operations.md", "docs/tuning.md", "README.md"]
PATH = re.compile(r"(?<![\w/.$-])((?:deploy|k8s|docs)/[\w./{},*-]*[\w}*])")


def _deploy_section() -> str:
    """The README's "Deploy" section (the quick start a new user follows)."""
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Deploy\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _paths(text: str) -> set[str]:
    found = set()
    for match in PATH.findall(text):
        # k8s/overlays/{dev,gpu} stands for both.
        braces = re.fullmatch(r"(.*)\{([\w,]+)\}(.*)", match)
        if braces:
            found |= {braces[1] + part + braces[3] for part in braces[2].split(",")}
        else:
            found.add(match)
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_paths_in_the_docs_exist(doc: str) -> None:
    """Every deploy/, k8s/ and docs/ path (or glob) the page names is in the repository."""
    text = (REPO / doc).read_text()
    missing = sorted(p for p in _paths(text) if not any(REPO.glob(p)))
    assert missing == []


def test_quick_start_builds_the_images_the_dev_overlay_runs(
    rendered: dict[str, list[Obj]],
) -> None:
    """The README's deploy commands build and load exactly the images the dev overlay uses."""
    text = _deploy_section()
    built = set(re.findall(r"docker build -f deploy/\S+ -t (\S+) \.", text))
    loaded = set(re.search(r"kind load docker-image (.+?) --name", text)[1].split())  # type: ignore[index]
    used = {
        c["image"]
        for obj in rendered["dev"]
        if obj["kind"] in ("Deployment", "StatefulSet")
        for c in obj["spec"]["template"]["spec"]["containers"]
        if c["image"].startswith("prefix-router/")
    }
    assert used == built == loaded


def test_demo_key_opens_the_dev_deployment(rendered: dict[str, list[Obj]]) -> None:
    """The key the quick start sends is the one whose digest the dev Secret holds."""
    text = _deploy_section()
    key = re.search(r"Authorization: Bearer (sk-[\w-]+)'", text)
    assert key is not None
    secret = one(rendered["dev"], "Secret", "prefix-router-secrets")
    entries = yaml.safe_load(secret["stringData"]["api-keys"])
    assert hashlib.sha256(key[1].encode()).hexdigest() in {e["key_sha256"] for e in entries}

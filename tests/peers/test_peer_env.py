"""Installing a peer: failures name the step and the log, and say whether the index was down."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from load_tests import peers
from load_tests.peers import PEERS, PeerSpec, PeerUnavailable, ensure_peer, free_port

pytestmark = pytest.mark.peers

MISSING = PeerSpec(
    name="no-such-peer",
    package="prefix-router-no-such-package",
    version="0.0.1",
    entry=("no-such-peer",),
    module=False,
)


@pytest.fixture
def fake_peer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A peer whose package exists nowhere, installed under a temporary cache root."""
    monkeypatch.setitem(PEERS, MISSING.name, MISSING)
    monkeypatch.setenv("PREFIX_ROUTER_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    return tmp_path


async def test_an_unreachable_index_is_reported_as_a_network_failure(
    fake_peer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing listening at the index, the error says network, names pip and its log."""
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{free_port()}/simple")
    with pytest.raises(PeerUnavailable) as caught:
        await asyncio.to_thread(ensure_peer, MISSING.name)
    assert caught.value.network is True
    assert caught.value.log == fake_peer / "peers" / "no-such-peer-0.0.1.log"
    assert "pip install prefix-router-no-such-package==0.0.1" in str(caught.value)
    assert str(caught.value.log) in str(caught.value)
    assert peers.peer_info(MISSING.name) is None  # no stamp: the next call tries again


async def test_a_missing_package_on_a_live_index_is_not_a_network_failure(
    fake_peer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index answering 404 for the package gives a plain failure, which tests must not skip."""

    async def not_found(request: web.Request) -> web.Response:
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/{tail:.*}", not_found)
    async with TestServer(app, host="127.0.0.1") as index:
        monkeypatch.setenv("PIP_INDEX_URL", str(index.make_url("/simple")))
        with pytest.raises(PeerUnavailable) as caught:
            await asyncio.to_thread(ensure_peer, MISSING.name)
    assert caught.value.network is False
    assert "No matching distribution" in str(caught.value)


def test_an_unknown_peer_name_is_a_value_error() -> None:
    """Asking for a peer that is not in PEERS fails at once, listing the known ones."""
    with pytest.raises(ValueError, match="sglang-router"):
        ensure_peer("nginx")

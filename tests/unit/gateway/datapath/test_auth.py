"""API keys: the `auth` config section (validated with key paths, never echoing a key) and the
pure check of an Authorization header against it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import Auth, parse_config
from gateway.datapath.auth import identify
from gateway.errors import ConfigError, Unauthorized

URL = "http://127.0.0.1:9001"
KEY = "sk-local-0123456789"
DIGEST = hashlib.sha256(KEY.encode()).hexdigest()


def _config(*keys: dict[str, Any]) -> dict[str, Any]:
    return {"replicas": [{"url": URL}], "auth": {"api_keys": list(keys)}}


def _error(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def test_keys_by_digest_or_plain() -> None:
    config = parse_config(
        _config({"name": "team-a", "sha256": DIGEST.upper()}, {"name": "local", "key": "k2"})
    )
    assert config.auth is not None
    a, local = config.auth.api_keys
    assert (a.name, a.sha256, a.digest) == ("team-a", DIGEST, bytes.fromhex(DIGEST))
    assert local.digest == hashlib.sha256(b"k2").digest()
    assert parse_config({"replicas": [{"url": URL}]}).auth is None  # off unless configured


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ([{"name": "a", "sha256": "abc"}], "auth.api_keys[0].sha256: expected the key's SHA-256"),
        ([{"name": "a", "sha256": "g" * 64}], "auth.api_keys[0].sha256: expected"),
        ([{"name": "a"}], "auth.api_keys[0]: give exactly one of 'sha256'"),
        ([{"name": "a", "key": KEY, "sha256": DIGEST}], "auth.api_keys[0]: give exactly one"),
        ([{"sha256": DIGEST}], "auth.api_keys[0].name: required key is missing"),
        ([{"name": "a", "key": KEY, "token": "x"}], "auth.api_keys[0].token: unknown key"),
        ([{"name": "a b", "key": KEY}], "auth.api_keys[0].name: String should match pattern"),
        ([{"name": "a", "key": ""}], "auth.api_keys[0].key: String should have at least 1"),
        ([], "auth.api_keys: List should have at least 1 item"),
        (
            [{"name": "a", "key": KEY}, {"name": "a", "key": "other"}],
            "auth.api_keys[1].name: 'a' is also auth.api_keys[0]",
        ),
        (
            [{"name": "a", "key": KEY}, {"name": "b", "sha256": DIGEST}],
            "auth.api_keys[1]: the same key as auth.api_keys[0]",
        ),
    ],
)
def test_errors_name_the_key_path(keys: list[dict[str, Any]], expected: str) -> None:
    message = _error(_config(*keys))
    assert message.startswith(expected), message
    assert KEY not in message and DIGEST not in message  # a config error is logged


def test_auth_takes_only_api_keys() -> None:
    assert _error({"replicas": [{"url": URL}], "auth": {"keys": []}}).startswith(
        "auth.api_keys: required key is missing; auth.keys: unknown key"
    )


def _auth() -> Auth:
    config = parse_config(_config({"name": "a", "sha256": DIGEST}, {"name": "b", "key": "kb"}))
    assert config.auth is not None
    return config.auth


@pytest.mark.parametrize(
    ("header", "name"),
    [(f"Bearer {KEY}", "a"), (f"bearer  {KEY} ", "a"), ("Bearer kb", "b")],
)
def test_a_valid_key_names_its_owner(header: str, name: str) -> None:
    assert identify(_auth(), header).name == name


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (None, "needs an API key"),
        ("", "needs an API key"),
        (KEY, "needs an API key"),  # no scheme
        (f"Basic {KEY}", "needs an API key"),
        ("Bearer ", "needs an API key"),
        ("Bearer kb2", "not valid"),
        (f"Bearer {DIGEST}", "not valid"),  # the digest is not the key
        ("Bearer \udcff", "not valid"),  # undecodable bytes never raise
    ],
)
def test_anything_else_is_unauthorized(header: str | None, says: str) -> None:
    with pytest.raises(Unauthorized) as info:
        identify(_auth(), header)
    assert says in str(info.value)
    assert (info.value.status, info.value.error_type) == (401, "unauthorized")
    assert info.value.headers == {"WWW-Authenticate": "Bearer"}


DEPLOY = Path(__file__).resolve().parents[4] / "deploy"


def _uncommented_auth(text: str) -> dict[str, Any]:
    """The `# auth:` example of a deploy config, uncommented, with a real digest in it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# auth:")
    block = [line.strip().removeprefix("# ") for line in lines[start:] if line.strip()]
    data = yaml.safe_load("\n".join(block).replace("<64 hex digits>", DIGEST))
    assert isinstance(data, dict)
    return data


def test_the_deploy_examples_of_auth_are_valid_config() -> None:
    configmap = yaml.safe_load((DEPLOY / "kubernetes/base/gateway-configmap.yaml").read_text())
    compose = (DEPLOY / "docker/gateway-config/gateway.yaml").read_text()
    for text in (configmap["data"]["gateway.yaml"], compose):
        config = parse_config({"replicas": [{"url": URL}], **_uncommented_auth(text)})
        assert config.auth is not None and config.auth.api_keys[0].sha256 == DIGEST


def test_a_header_of_any_bytes_is_unauthorized_and_compared_as_sent() -> None:
    # aiohttp hands bytes that are not UTF-8 over as surrogates (surrogateescape).
    auth = parse_config(_config({"name": "q", "key": "sk-?"})).auth
    assert auth is not None
    for value in ("Bearer \udc80\udcff", "Bearer sk-\udcff", "\udcff x", "Bearer \udcc3", "Bearer"):
        with pytest.raises(Unauthorized):
            identify(auth, value)
    assert identify(auth, "Bearer sk-?").name == "q"

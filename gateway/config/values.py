"""The config's value rules: replica URLs, absolute paths, `${NAME}` references to the
environment, job store locations (a file or a PostgreSQL URL), and passwords kept out of every
message (`redacted`)."""

from __future__ import annotations

import os
import re
import urllib.parse

from yarl import URL


def valid_replica_url(value: str) -> str:
    try:
        url = URL(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("expected an absolute http:// or https:// URL with a host")
    if url.query_string or url.fragment or url.user:
        raise ValueError("a replica URL takes no query, fragment or credentials")
    return str(url).rstrip("/")


TCP_ENDPOINT = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})")


def valid_zmq_endpoint(value: str) -> str:
    """An endpoint the gateway connects a ZeroMQ socket to: tcp://host:port (a literal IPv6
    address in brackets), or ipc://path."""
    match = TCP_ENDPOINT.fullmatch(value)
    if match is not None and 1 <= int(match.group(2)) <= 65535:
        return value
    if value.startswith("ipc://") and len(value) > len("ipc://"):
        return value
    raise ValueError("expected tcp://host:port (port 1-65535) or ipc://path")


def valid_absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("expected a path starting with '/'")
    return value


ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _from_environment(value: str) -> str:
    """`${NAME}` replaced by the gateway's environment variable NAME (a URL with a password
    can then live in a Kubernetes Secret, not in the config file)."""

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ValueError(
                f"${{{name}}} is not set in the gateway's environment (set it, e.g. from a "
                "Kubernetes Secret with env[].valueFrom.secretKeyRef)"
            )
        return os.environ[name]

    return ENV_REFERENCE.sub(lookup, value)


def valid_store_path(value: str) -> str:
    value = _from_environment(value)
    if not value.strip():
        raise ValueError(
            "expected a file path for an SQLite job store or a postgresql://user@host:port/db URL"
        )
    scheme, sep, _ = value.partition("://")
    if is_postgres_url(value):
        parts = urllib.parse.urlsplit(value)
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError("the URL's port is not a number") from None
        if not parts.path.strip("/") and "dbname=" not in parts.query:
            raise ValueError(f"name the database: {scheme}://user@host:5432/DBNAME")
    elif sep and scheme.isalpha():
        raise ValueError(
            f"'{scheme}://' is not a job store: use postgresql://user@host:port/db or a file path"
        )
    return value


def valid_limits_store(value: str) -> str:
    """A postgresql:// URL (`${NAME}` from the environment), as the jobs store takes one."""
    value = valid_store_path(value)
    if not is_postgres_url(value):
        raise ValueError(
            "expected a postgresql://user@host:port/db URL (the limits are shared there)"
        )
    return value


POSTGRES_SCHEMES = ("postgresql", "postgres")


def is_postgres_url(store: str) -> bool:
    return store.partition("://")[0] in POSTGRES_SCHEMES and "://" in store


PASSWORD_PARAMETER = re.compile(r"(?i)(password=)([^&\s]*)")


def url_password(value: str) -> str | None:
    """The password in a URL's user part, however it is written (unencoded '/', '#' or '@')."""
    _, sep, rest = value.partition("://")
    credentials, at, _ = rest.rpartition("@")
    return credentials.split(":", 1)[1] if sep and at and ":" in credentials else None


def redacted(value: str) -> str:
    """A URL (or libpq `key=value` string) as a message may show it: no password, in the user
    part or as `password=`; anything else unchanged."""
    password = url_password(value)
    if password is not None:
        scheme, _, rest = value.partition("://")
        user, _, _ = rest.partition(":")
        value = f"{scheme}://{user}:***@{rest.rpartition('@')[2]}"
    return PASSWORD_PARAMETER.sub(r"\1***", value)


HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def sha256_hex(value: str) -> str:
    if not HEX_SHA256.fullmatch(value):
        raise ValueError("expected the key's SHA-256 as 64 hex digits (sha256sum of the key)")
    return value.lower()

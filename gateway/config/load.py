"""How config enters the program: `load_config(path)` reads the YAML (bounded), and
`parse_config` validates it fully into the frozen GatewayConfig. Every error names the key path
and what was expected (`replicas[2].url: ...`), quotes at most a little of the value, and shows
no password or API key, so a bad file is fixed from one line and no secret reaches a log."""

from __future__ import annotations

import os
import re
import reprlib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from gateway import yamlfile
from gateway.config.schema import GatewayConfig
from gateway.config.values import ENV_REFERENCE, PASSWORD_PARAMETER, redacted, url_password
from gateway.errors import ConfigError, key_path

MAX_QUOTED_CHARS = 80  # of a value a config error quotes
MAX_PROBLEMS = 10  # listed in one error; the rest are counted


class _Quoted(reprlib.Repr):
    """A value as an error quotes it: a few items of a few levels, each string without its
    password, so the work and the message stay small whatever the value holds."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxother = 3, 40
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 4

    def repr_str(self, x: str, level: int) -> str:
        return repr(_clip(redacted(x)))


def _clip(text: str) -> str:
    return text if len(text) <= MAX_QUOTED_CHARS else text[:MAX_QUOTED_CHARS] + "..."


def _describe(error: ErrorDetails) -> str | None:
    kind, loc, msg = error["type"], tuple(error["loc"]), error["msg"]
    if kind == "extra_forbidden":
        return f"{key_path(loc)}: unknown key"
    if kind == "missing":
        return f"{key_path(loc)}: required key is missing"
    if kind == "too_short" and loc == ("replicas",):
        # pydantic also reports the length when an item failed; only an empty list is news.
        return None if error.get("input") else "replicas: at least one replica is required"
    msg = msg.removeprefix("Value error, ").replace("a valid tuple", "a list")
    msg = msg.replace("Tuple should", "List should")
    if not loc and ": " in msg:  # model-level validators already carry their path
        return msg
    if loc[:1] == ("auth",):  # never echo a key (or its digest) into a log line
        return f"{key_path(loc)}: {msg}"
    return f"{key_path(loc)}: {msg} (got {_clip(_Quoted().repr(error.get('input')))})"


def _secrets(data: Any) -> set[str]:
    """What no config message may show, wherever a value turns up again: URL passwords (also
    those `${NAME}` expands to) and the API keys and digests under `auth`."""
    found: set[str] = set()
    seen: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        value, under_auth = stack.pop()
        if isinstance(value, str):
            for text in (value, ENV_REFERENCE.sub(_variable_or_reference, value)):
                found.update(m.group(2) for m in PASSWORD_PARAMETER.finditer(text))
                found.add(url_password(text) or "")
        elif id(value) not in seen and isinstance(value, dict | list | tuple):
            seen.add(id(value))
            pairs = value.items() if isinstance(value, dict) else ((None, v) for v in value)
            for key, item in pairs:
                if under_auth and key in ("key", "sha256") and isinstance(item, str):
                    found.add(item)
                stack.append((item, under_auth or key == "auth"))
    return {secret for secret in found if len(secret) >= 4}  # shorter: a quoted value hides it


def _variable_or_reference(match: re.Match[str]) -> str:
    return os.environ.get(match.group(1), match.group(0))


def _scrubbed(message: str, secrets: set[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


def parse_config(data: Any) -> GatewayConfig:
    if data is None:
        raise ConfigError("(top level): the file is empty; expected a mapping with 'replicas'")
    if not isinstance(data, dict):
        raise ConfigError(f"(top level): expected a mapping, got {type(data).__name__}")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        secrets = _secrets(data)
        problems = [_scrubbed(p, secrets) for p in map(_describe, exc.errors()) if p]
        shown = problems[:MAX_PROBLEMS]
        if len(problems) > MAX_PROBLEMS:
            shown.append(f"and {len(problems) - MAX_PROBLEMS} more")
        raise ConfigError("; ".join(shown), problems) from None


def load_config(path: str | Path) -> GatewayConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return parse_config(yamlfile.load_yaml(text))

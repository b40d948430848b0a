"""Hostile inputs for every endpoint of the gateway and the replica (issue 30): a fixed list of
endpoints with a valid request each, a fixed list of cases that spoil one part of it (the body,
a field inside it, a header, the query, a path parameter), a raw-socket client that sends bytes
no HTTP library would, and the rule an answer must keep. tests/integration/test_hostile_inputs.py
runs them against real processes and reports every answer that broke the rule.

The rule: an answer arrives in time, with a status below 500; and an inference endpoint never
accepts (2xx) a body that is not a valid request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal

DEPTH = 20_000  # far past Python's recursion limit (1,000) and any parser's default
HUGE_BYTES = 1_200_000  # over both processes' body limits (HostileFleet sets them to 1,000,000)
ANSWER_TIMEOUT_S = 10.0  # no endpoint needs this long for these inputs: longer is a hang
KEEP_BYTES = 256 * 1024  # of an answer; the rest is read and dropped
SEED = 30
API_KEY = "fuzz-key-0123456789"
ADMIN_TOKEN = "fuzz-admin-token-0123456789"

Auth = Literal["key", "admin", "none"]
Where = tuple[str | int, ...]


@dataclass(frozen=True)
class Endpoint:
    """One method and path, and a valid request to it. `field`: where inside `body` hostile
    values go; `strict`: an inference endpoint, which must refuse (4xx) every invalid body;
    `jsonl`: the body is a batch file whose lines are `body`."""

    target: Literal["gateway", "replica"]
    method: str
    path: str  # may hold {param}: filled with `param` (valid) or a hostile value
    body: dict[str, Any] | None = None
    field: Where = ()
    auth: Auth = "key"
    strict: bool = False
    jsonl: bool = False
    param: str = ""
    fields_only: bool = False  # a second look at one more field: the field cases alone

    @property
    def name(self) -> str:
        where = f" [{'.'.join(map(str, self.field))}]" if self.fields_only else ""
        return f"{self.target} {self.method} {self.path}{where}"


@dataclass(frozen=True)
class Request:
    method: bytes
    target: bytes  # path and query, as sent
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    chunked: bool = False


@dataclass(frozen=True)
class Case:
    """One hostile input: how it changes a valid request. `invalid`: the request it makes is
    not a valid inference request (a strict endpoint must refuse it)."""

    name: str
    apply: Callable[[Endpoint, Request], Request | None]  # None: not for this endpoint
    invalid: bool = True
    unauthorized: bool = False  # the credential is not one the gateway knows: never a 2xx


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no status line (see `problem`)
    head: bytes = b""
    body: bytes = b""
    problem: str = ""  # timeout, reset, malformed...
    seconds: float = 0.0

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


@dataclass(frozen=True)
class Outcome:
    endpoint: Endpoint
    case: str
    answer: Answer
    broken: str = ""  # the rule it broke; '' when it kept it

    def line(self) -> str:
        status = self.answer.status if self.answer.status is not None else self.answer.problem
        body = self.answer.body[:200]
        return f"{self.endpoint.name} | {self.case} | {status} | {self.broken} | {body!r}"


# The endpoints. {job}, {batch} are ids the test creates first; {model} a served model.

COMPLETION = {"model": "tiny-gpt", "prompt": "hello fuzz", "max_tokens": 2, "temperature": 0}
CHAT = {
    "model": "tiny-gpt",
    "messages": [{"role": "user", "content": "hello fuzz"}],
    "max_tokens": 2,
    "temperature": 0,
}
INFER = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
JOB = {"custom_id": "fuzz", "url": "/v1/completions", "body": COMPLETION}
BATCH_CREATE = {"input_file_id": "file-none", "endpoint": "/v1/completions",
                "completion_window": "24h", "metadata": {"k": "v"}}  # fmt: skip

# The replica's own API: reached directly, and through the gateway's proxy.
RELAYED: list[tuple[str, str, dict[str, Any] | None, Where, bool]] = [
    ("POST", "/v1/completions", COMPLETION, ("prompt",), True),
    ("POST", "/v1/chat/completions", CHAT, ("messages", 0, "content"), True),
    ("POST", "/tokenize", COMPLETION, ("prompt",), True),
    ("POST", "/invocations", COMPLETION, ("prompt",), True),
    ("POST", "/v2/models/{model}/infer", INFER, ("inputs", 0, "data"), True),
    ("POST", "/v2/models/{model}/versions/1/infer", INFER, ("inputs", 0, "data"), True),
    ("GET", "/v2/models/{model}", None, (), False),
    ("GET", "/v2/models/{model}/versions/1", None, (), False),
    ("GET", "/v2/models/{model}/ready", None, (), False),
    ("GET", "/v2/health/ready", None, (), False),
    ("GET", "/v2/health/live", None, (), False),
    ("GET", "/v2", None, (), False),
    ("GET", "/health", None, (), False),
    ("GET", "/ping", None, (), False),
    ("GET", "/load", None, (), False),
    ("GET", "/cache/blocks", None, (), False),
    ("GET", "/no/such/path", None, (), False),
]
REPLICA_ONLY = ["/metrics", "/v1/models", "/openapi.json"]  # the gateway answers its own
GATEWAY_OWN: list[tuple[str, str, Auth]] = [
    ("GET", "/healthz", "none"),
    ("GET", "/readyz", "none"),
    ("GET", "/metrics", "none"),
    ("GET", "/openapi.json", "none"),
    ("GET", "/ui", "none"),
    ("GET", "/ui/", "none"),
    ("GET", "/ui/status.js", "none"),
    ("GET", "/ui/status.json", "none"),
    ("GET", "/ui/no-such-file", "none"),
    ("GET", "/admin/replicas", "admin"),
    ("POST", "/admin/reload", "admin"),
    ("GET", "/admin/no-such-endpoint", "admin"),
    ("GET", "/v1/models", "key"),
    ("GET", "/v1/models/{model}", "key"),
]
JOBS: list[tuple[str, str, dict[str, Any] | None, Where, bool]] = [
    ("POST", "/v1/jobs", JOB, ("body", "prompt"), False),
    ("GET", "/v1/jobs", None, (), False),
    ("GET", "/v1/jobs/{job}", None, (), False),
    ("DELETE", "/v1/jobs/{job}", None, (), False),
    ("POST", "/v1/batches", JOB, ("body", "prompt"), True),  # jsonl
    ("GET", "/v1/batches", None, (), False),
    ("GET", "/v1/batches/{batch}", None, (), False),
    ("GET", "/v1/batches/{batch}/results", None, (), False),
    ("POST", "/v1/batches/{batch}/cancel", None, (), False),
    ("POST", "/v1/batches", BATCH_CREATE, ("completion_window",), False),  # OpenAI's form
    ("GET", "/v1/files", None, (), False),
    ("GET", "/v1/files/{file}", None, (), False),
    ("GET", "/v1/files/{file}/content", None, (), False),
    ("DELETE", "/v1/files/{file}", None, (), False),
]


def endpoints(job: str, batch: str) -> list[Endpoint]:
    """Every endpoint of both processes; `job`, `batch`: ids of a job and a batch that exist."""
    params = {"{model}": "classifier", "{job}": job, "{batch}": batch, "{file}": "file-none"}

    def param(path: str) -> str:
        return next((value for name, value in params.items() if name in path), "")

    out = [
        Endpoint(t, m, p, b, w, auth="none" if t == "replica" else "key", strict=s, param=param(p))
        for t in ("replica", "gateway")
        for m, p, b, w, s in RELAYED
    ]
    out += [Endpoint("replica", "GET", path, auth="none") for path in REPLICA_ONLY]
    out += [Endpoint("gateway", m, p, auth=a, param=param(p)) for m, p, a in GATEWAY_OWN]
    out += [Endpoint("gateway", m, p, b, w, jsonl=j, param=param(p)) for m, p, b, w, j in JOBS]
    # A stored field the gateway reads back: custom_id, as the whole value.
    custom_id = ("custom_id",)
    out.append(Endpoint("gateway", "POST", "/v1/jobs", JOB, custom_id, fields_only=True))
    out.append(
        Endpoint("gateway", "POST", "/v1/batches", JOB, custom_id, jsonl=True, fields_only=True)
    )
    return out


# Building requests


def auth_header(auth: Auth) -> tuple[tuple[bytes, bytes], ...]:
    secret = {"key": API_KEY, "admin": ADMIN_TOKEN}.get(auth)
    return ((b"Authorization", f"Bearer {secret}".encode()),) if secret else ()


def encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def valid_request(endpoint: Endpoint) -> Request:
    headers = auth_header(endpoint.auth)
    body = b""
    if endpoint.body is not None:
        body = encode(endpoint.body)
        if endpoint.jsonl:  # two lines, so a bad second line can fail alone
            second = dict(endpoint.body, custom_id="fuzz-2")
            body += b"\n" + encode(second) + b"\n"
        kind = b"application/jsonl" if endpoint.jsonl else b"application/json"
        headers += ((b"Content-Type", kind),)
    path = endpoint.path
    if endpoint.param:
        path = path.split("{")[0] + endpoint.param + path.split("}")[1]
    return Request(endpoint.method.encode(), path.encode(), headers, body)


def with_field(endpoint: Endpoint, request: Request, raw: bytes) -> Request | None:
    """The valid body with the value at endpoint.field replaced by the JSON text `raw`."""
    if endpoint.body is None or not endpoint.field:
        return None
    marker = "\x1f-hostile-\x1f"
    value = json.loads(json.dumps(endpoint.body))
    holder = value
    for step in endpoint.field[:-1]:
        holder = holder[step]
    holder[endpoint.field[-1]] = marker
    line = encode(value).replace(encode(marker), raw)
    if endpoint.jsonl:  # a good line, then the hostile one: it must fail alone
        first = encode(dict(endpoint.body, custom_id="fuzz-good"))
        return replace(request, body=first + b"\n" + line + b"\n")
    return replace(request, body=line)


def _header(endpoint: Endpoint, request: Request, name: bytes, value: bytes) -> Request:
    kept = tuple((n, v) for n, v in request.headers if n.lower() != name.lower())
    return replace(request, headers=(*kept, (name, value)))


def _query(endpoint: Endpoint, request: Request, query: bytes) -> Request:
    return replace(request, target=request.target + b"?" + query)


def _param(endpoint: Endpoint, request: Request, value: bytes) -> Request | None:
    if not endpoint.param:
        return None
    return replace(request, target=request.target.replace(endpoint.param.encode(), value, 1))


def deep_array(depth: int = DEPTH) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_object(depth: int = DEPTH) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def huge_json(endpoint: Endpoint) -> bytes:
    """Valid JSON (the endpoint's own shape where it has one) over HUGE_BYTES."""
    filler = "x" * HUGE_BYTES
    if endpoint.body is not None and endpoint.field:
        return encode(dict(endpoint.body, padding=filler))
    return encode({"padding": filler})


def control_string(rng: random.Random) -> bytes:
    """A JSON string holding raw (unescaped) control bytes and NUL: invalid JSON."""
    raw = bytes(rng.choice([*range(0, 32), 127]) for _ in range(64))
    return b'"fuzz' + raw + b'"'


def cases() -> list[Case]:
    """Every hostile input, in a fixed order; random bytes come from a fixed seed."""
    rng = random.Random(SEED)
    non_utf8 = bytes(rng.randrange(0x80, 0x100) for _ in range(32))
    everything = [Case("valid request", lambda e, r: r, invalid=False)]
    everything += _body_cases(non_utf8)
    everything += _field_cases(rng, non_utf8)
    everything += _header_cases(non_utf8)
    everything += [
        Case(f"query: {name}", partial(_query, query=query), invalid=False)
        for name, query in [
            ("percent-encoded non-UTF-8", b"limit=%ff%fe&after=%c3%28&model=%ff"),
            ("raw non-UTF-8 bytes", b"limit=\xff&after=" + non_utf8),
            ("superscript digit", b"limit=%C2%B2&after=%C2%B2"),
            ("5,000-digit limit", b"limit=" + b"9" * 5000),
            ("NUL", b"limit=1%00&after=%00&model=%00"),
        ]
    ]
    everything += [  # path parameters: ids and model names
        Case(f"param: {name}", partial(_param, value=value), invalid=False)
        for name, value in [
            ("percent-encoded non-UTF-8", b"%ff%fe"),
            ("raw non-UTF-8", b"\xff\xfe"),
            ("%00", b"a%00b"),
            ("4,000 chars", b"z" * 4000),
            ("dot segments", b"..%2f..%2fadmin"),
        ]
    ]
    return everything


def _body_cases(non_utf8: bytes) -> list[Case]:
    def whole(make: Callable[[Endpoint], bytes]) -> Callable[[Endpoint, Request], Request]:
        return lambda e, r: replace(r, body=make(e))

    def chunked(e: Endpoint, r: Request) -> Request:
        return replace(r, body=huge_json(e), chunked=True)

    return [
        Case("body: array nested 20,000 deep", whole(lambda e: deep_array())),
        Case("body: object nested 20,000 deep", whole(lambda e: deep_object())),
        Case("body: 1.2 MB JSON, Content-Length", whole(huge_json)),
        Case("body: 1.2 MB JSON, chunked", chunked),
        Case("body: non-UTF-8 bytes", whole(lambda e: b'{"prompt":"' + non_utf8 + b'"}')),
        Case("body: UTF-16 JSON", whole(lambda e: json.dumps(e.body).encode("utf-16")), False),
        Case("body: not JSON", whole(lambda e: b"\x00\x01 not json {")),
        Case("body: JSON null", whole(lambda e: b"null")),
        Case("body: NaN and Infinity", whole(lambda e: b'{"max_tokens":NaN,"x":Infinity}')),
    ]


def _field_cases(rng: random.Random, non_utf8: bytes) -> list[Case]:
    raw_controls = bytes(rng.choice([*range(0, 32), 127]) for _ in range(64))  # invalid JSON
    escaped_controls = encode("".join(map(chr, range(32))) + "\x7f")  # valid JSON
    values: list[tuple[str, bytes, bool]] = [
        ("array nested 20,000 deep", deep_array(), True),
        ("object nested 20,000 deep", deep_object(), True),
        ("raw control bytes and NUL", b'"fuzz' + raw_controls + b'"', True),
        ("escaped control chars and \\u0000", escaped_controls, False),
        ("lone surrogate \\ud800", b'"a\\ud800b"', True),
        ("lone surrogate \\udfff alone", b'"\\udfff"', True),
        ("non-UTF-8 bytes in string", b'"' + non_utf8 + b'"', True),
        ("1e999", b"1e999", True),
        ("-1e999", b"-1e999", True),
        ("5,000-digit integer", b"9" * 5000, True),
        ("2**64", str(2**64).encode(), True),
        ("wrong type (object)", b'{"text":1}', True),
        ("wrong type (bool)", b"true", True),
        ("500,000-char string", encode("y" * 500_000), False),
    ]
    return [Case(f"field: {name}", partial(with_field, raw=raw), bad) for name, raw, bad in values]


def _header_cases(non_utf8: bytes) -> list[Case]:
    auth = b"Authorization"
    bearers = [
        ("non-UTF-8 bearer", b"Bearer \xff\xfe" + non_utf8),
        ("control byte", b"Bearer a\x01b"),
        ("7,000 bytes", b"Bearer " + b"k" * 7000),
    ]
    out = [
        Case(f"Authorization: {name}", partial(_header, name=auth, value=value), False, True)
        for name, value in bearers
    ]
    headers = [  # none makes the request invalid; a bad value is refused or ignored
        (b"Idempotency-Key", "non-UTF-8", non_utf8),
        (b"Idempotency-Key", "250 chars", b"i" * 250),
        (b"Idempotency-Key", "NUL", b"a\x00b"),
        (b"X-Session-Id", "non-UTF-8", non_utf8),
        (b"X-Request-Id", "non-UTF-8", non_utf8),
        (b"X-Forwarded-For", "non-UTF-8", non_utf8),
        (b"Content-Type", "non-UTF-8", b"application/json; charset=" + non_utf8),
        (b"Content-Type", "unknown charset", b"application/json; charset=utf-77"),
        (b"Content-Type", "multipart, no boundary", b"multipart/form-data"),
    ]
    out += [
        Case(f"{name.decode()}: {what}", partial(_header, name=name, value=value), False)
        for name, what, value in headers
    ]
    gzip = partial(_header, name=b"Content-Encoding", value=b"gzip")
    out.append(Case("Content-Encoding: gzip, body not gzip", gzip))
    return out


def requests_for(endpoint: Endpoint) -> Iterator[tuple[Case, Request]]:
    base = valid_request(endpoint)
    for case in cases():
        if endpoint.fields_only and not case.name.startswith("field: "):
            continue
        request = case.apply(endpoint, base)
        if request is not None:
            yield case, request


# The rule


def judge(endpoint: Endpoint, case: Case, answer: Answer) -> str:
    """'' when the answer keeps the rule; else what is wrong with it."""
    if answer.status is None:
        return f"no answer ({answer.problem})"
    if answer.status >= 500:
        return "5xx"
    if answer.status < 200:
        return "not a final status"
    guarded = endpoint.target == "gateway" and endpoint.auth != "none"
    if guarded and case.unauthorized and answer.status < 300:
        return "let an unknown credential in"
    if endpoint.strict and case.invalid and answer.status < 300:
        return "accepted an invalid request"
    if endpoint.strict and not case.invalid and case.name == "valid request":
        return "" if answer.status < 300 else "refused a valid request"
    return ""


# A raw HTTP/1.1 client: bytes as given, one connection per request


def serialize(request: Request, host: bytes) -> tuple[bytes, bytes]:
    """The head and the body as they go on the wire."""
    lines = [request.method + b" " + request.target + b" HTTP/1.1", b"Host: " + host]
    lines += [name + b": " + value for name, value in request.headers]
    lines.append(b"Connection: close")
    body = request.body
    if request.chunked:
        lines.append(b"Transfer-Encoding: chunked")
        size = 64 * 1024
        parts = [body[i : i + size] for i in range(0, len(body), size)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"
    elif body or request.method in (b"POST", b"PUT"):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n", body


async def send(host: str, port: int, request: Request, timeout_s: float) -> Answer:
    loop = asyncio.get_running_loop()
    start = loop.time()
    head, body = serialize(request, f"{host}:{port}".encode())
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writing = asyncio.create_task(_write(writer, head, body))
                raw, problem = await _read(reader)
                writing.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await writing
            finally:
                writer.close()
    except TimeoutError:
        return Answer(None, problem=f"no answer in {timeout_s:.0f} s", seconds=timeout_s)
    except OSError as exc:
        return Answer(None, problem=f"connect failed: {exc}")
    return _parse(raw, problem, loop.time() - start)


async def _write(writer: asyncio.StreamWriter, head: bytes, body: bytes) -> None:
    """Head, then the body in pieces: a server that answers early and stops reading only
    stops this task, never the read of its answer."""
    with contextlib.suppress(OSError):
        writer.write(head)
        for i in range(0, len(body), 64 * 1024):
            writer.write(body[i : i + 64 * 1024])
            await writer.drain()
        await writer.drain()


async def _read(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    data = bytearray()
    try:
        while chunk := await reader.read(65536):
            if len(data) < KEEP_BYTES:
                data += chunk
    except OSError as exc:
        return bytes(data), f"connection error after {len(data)} bytes: {exc!r}"
    return bytes(data), ""


def _parse(raw: bytes, problem: str, seconds: float) -> Answer:
    head, sep, body = raw.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        why = problem or ("closed without an answer" if not raw else "malformed answer")
        return Answer(None, head, body, problem=why, seconds=seconds)
    if b"\r\ntransfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return Answer(int(parts[1]), head, body, problem, seconds)


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


@dataclass
class Report:
    """What the run found, as lines a reader can dispatch from."""

    outcomes: list[Outcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # logs, counts, liveness

    @property
    def broken(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.broken]

    def text(self) -> str:
        broken = self.broken
        lines = [f"{len(broken)} of {len(self.outcomes)} answers broke the rule"]
        lines += [o.line() for o in broken]
        lines += self.problems
        return "\n".join(lines)

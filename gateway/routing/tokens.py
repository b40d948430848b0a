"""A prompt's token ids as the engine behind the gateway computes them, so that precise prefix
routing hashes the engine's KV blocks (prefix.chain over these ids).

Two tokenizers, chosen by `load_tokenizer(spec)`:
- `bytes`: our replicas' (BOS 256 then the UTF-8 bytes; messages through the byte models'
  template, prefix.prompt_text): the ids prefix.block_hashes hashes.
- a path: a Hugging Face tokenizer from the model's own files (tokenizer.json, with
  tokenizer_config.json or chat_template.jinja beside it), applied as vLLM applies it to an
  OpenAI request. A completion's `prompt` is encoded with special tokens (the post-processor's
  BOS); a chat's messages are rendered by the chat template the way transformers'
  apply_chat_template renders it (a sandboxed jinja2) and encoded without them, since the
  template writes its own BOS.
Token ids a client sends as its prompt are used as they are. `ids` returns None for a request it
cannot reproduce (no prompt, an image part, tools, a template that refuses the messages); it
never raises for one request. Loading fails with a TokenizerError that says what to fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gateway.errors import ConfigError
from gateway.routing.prefix import BOS, prompt_text

if TYPE_CHECKING:
    from jinja2 import Environment, Template, nodes
    from tokenizers import Tokenizer

MAX_TOKEN_ID = 2**32 - 1  # prefix.chain packs ids as u32
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")  # fmt: skip
# transformers' classes that rebuild the post-processor from tokenizer_config.json's
# add_bos_token / add_eos_token (defaults: BOS yes, EOS no) instead of keeping tokenizer.json's.
BOS_EOS_FROM_CONFIG = {f"{family}Tokenizer{fast}" for family in ("Llama", "CodeLlama", "Gemma")
                       for fast in ("", "Fast")}  # fmt: skip


class TokenizerError(ConfigError):
    """A tokenizer that cannot be loaded; the message names the file and what to fix."""


class PromptTokenizer(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def offload(self) -> bool:
        """It costs enough on a long prompt (milliseconds) to be run off the event loop."""
        ...

    def ids(self, payload: dict[str, Any]) -> list[int] | None:
        """The prompt's token ids; None: no prompt this tokenizer can read."""
        ...

    def head(self, payload: dict[str, Any], n: int) -> Head | None:
        """The prompt's first `n` token ids and how many it has in all (what routing reads:
        a long prompt's tail is never hashed); None as for `ids`."""
        ...


Head = tuple[list[int], int]  # a prompt's first token ids, and its length in tokens


def head_of(ids: list[int] | None, n: int) -> Head | None:
    return None if ids is None else (ids[:n], len(ids))


class BytesTokenizer:
    """Our replicas' tokenizer."""

    name = "bytes"
    offload = False

    def ids(self, payload: dict[str, Any]) -> list[int] | None:
        given = given_ids(first_prompt(payload.get("prompt")))
        if given is not None:
            return given
        text = prompt_text(payload)
        if text is None:
            return None
        return [BOS, *text.encode("utf-8", errors="surrogatepass")]

    def head(self, payload: dict[str, Any], n: int) -> Head | None:
        given = given_ids(first_prompt(payload.get("prompt")))
        if given is not None:
            return head_of(given, n)
        text = prompt_text(payload)
        if text is None:
            return None
        data = text.encode("utf-8", errors="surrogatepass")  # a long one is not listed whole
        return [BOS, *data[: max(0, n - 1)]][:n], len(data) + 1


@dataclass(frozen=True, eq=False)
class HfTokenizer:
    """A Hugging Face tokenizer and chat template, applied to requests as vLLM applies them."""

    name: str
    tokenizer: Tokenizer
    template: Template | None  # None: the model has none, and chats are not read
    content_as_parts: bool = False  # the template loops over a message's content
    special_tokens: dict[str, Any] = field(default_factory=dict)  # bos_token... as text
    offload: bool = True  # encoding runs in Rust without the GIL: a thread takes it

    @classmethod
    def load(cls, path: str | Path) -> HfTokenizer:
        """From a tokenizer.json file or the directory holding one."""
        file = _tokenizer_file(Path(path).expanduser())
        config = _read_config(file.parent / "tokenizer_config.json")
        special_tokens = _special_tokens(config)
        tokenizer = _read_tokenizer(file, config, special_tokens)
        source = _template_source(file.parent, config)
        template, as_parts = _compile(source, file.parent) if source else (None, False)
        return cls(str(file), tokenizer, template, as_parts, special_tokens)

    def ids(self, payload: dict[str, Any]) -> list[int] | None:
        prompt = first_prompt(payload.get("prompt"))
        if isinstance(prompt, str):
            return self._encode(prompt, _flag(payload, "add_special_tokens", default=True))
        if prompt is not None:
            return given_ids(prompt)
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        text = self._render(messages, payload)
        if text is None:
            return None
        return self._encode(text, _flag(payload, "add_special_tokens", default=False))

    def head(self, payload: dict[str, Any], n: int) -> Head | None:
        return head_of(self.ids(payload), n)

    def _render(self, messages: list[Any], payload: dict[str, Any]) -> str | None:
        # Tools: vLLM renders its own schema dump of them, which the gateway cannot reproduce.
        if self.template is None or payload.get("tools") or payload.get("continue_final_message"):
            return None
        conversation = [_message(m, self.content_as_parts) for m in messages]
        if any(m is None for m in conversation):
            return None
        extra = payload.get("chat_template_kwargs")
        variables = {
            **self.special_tokens,
            "add_generation_prompt": _flag(payload, "add_generation_prompt", default=True),
            **(extra if isinstance(extra, dict) else {}),
            "messages": conversation,
            "tools": [] if payload.get("tools") == [] else None,  # as vLLM passes them
            "documents": None,
        }
        try:
            return self.template.render(variables)
        except Exception:  # the template's own code: raise_exception, an operation on odd values
            return None

    def _encode(self, text: str, special_tokens: bool) -> list[int] | None:
        # The batch call skips offsets (a quarter faster) and lets go of the GIL while it runs.
        try:
            encoded = self.tokenizer.encode_batch_fast([text], add_special_tokens=special_tokens)
        except Exception:  # text Rust cannot take (a lone surrogate)
            return None
        return encoded[0].ids


def first_prompt(prompt: object) -> object:
    """A completion's prompt, or the first of a batch of them (the one routed on)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        return prompt[0]
    return prompt


def given_ids(prompt: object) -> list[int] | None:
    """A prompt sent as token ids: used as it is when each fits a u32."""
    if not isinstance(prompt, list) or not prompt:
        return None
    return list(prompt) if all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in prompt) else None


def _flag(payload: dict[str, Any], key: str, *, default: bool) -> bool:
    value = payload.get(key)
    return value if isinstance(value, bool) else default


def _message(message: object, as_parts: bool) -> dict[str, Any] | None:
    """A message as vLLM hands it to the template: content as one string (text parts joined by
    newlines, empty ones dropped) or, for a template that loops over it, as text parts. None:
    one we cannot reproduce (an image or other part, tool calls)."""
    if not isinstance(message, dict) or message.get("tool_calls"):
        return None
    role = message.get("role")
    texts = _texts(message.get("content"))
    if not isinstance(role, str) or texts is None:
        return None
    if as_parts:
        content: Any = [{"type": "text", "text": text} for text in texts]
    else:
        content = "\n".join(text for text in texts if text)
    rendered = {"role": role, "content": content}
    for key in ("name", "tool_call_id"):
        if isinstance(message.get(key), str):
            rendered[key] = message[key]
    return rendered


def _texts(content: object) -> list[str] | None:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return None
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else "str"
        if kind == "str":
            text = part
        elif kind in ("text", "refusal"):
            text = part.get(kind)
        else:
            return None  # media: the engine puts placeholders in the prompt that we cannot know
        if isinstance(text, str):
            texts.append(text)
        elif text is not None:
            return None
    return texts


def _tokenizer_file(path: Path) -> Path:
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(
            f"tokenizer {path}: no such file; give the model's tokenizer.json or the directory "
            "holding it (with its tokenizer_config.json), or `bytes`"
        )
    return file.resolve()


def _read_config(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}  # no chat template, no special token names: completions only
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{file}: cannot read it as JSON ({exc}); fix or remove it") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{file}: must be a JSON object; fix or remove it")
    return config


def _special_tokens(config: dict[str, Any]) -> dict[str, Any]:
    """bos_token and the others, as the template sees them (an AddedToken's content)."""
    found: dict[str, Any] = {}
    for key in SPECIAL_TOKENS:
        if (text := _token_text(config.get(key))) is not None:
            found[key] = text
    extra = config.get("additional_special_tokens")
    if isinstance(extra, list):
        found["additional_special_tokens"] = [t for t in map(_token_text, extra) if t is not None]
    return found


def _token_text(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_tokenizer(file: Path, config: dict[str, Any], special: dict[str, Any]) -> Tokenizer:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TokenizerError(f"tokenizer {file}: install the `tokenizers` package") from None
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for bad JSON or an unknown model
        raise TokenizerError(
            f"{file}: not a Hugging Face tokenizer.json ({exc}); use the file from the model's "
            "repository"
        ) from None
    # transformers turns off a saved truncation or padding on every encode without options.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    if config.get("tokenizer_class") in BOS_EOS_FROM_CONFIG:
        _bos_eos_from_config(tokenizer, config, special)
    return tokenizer


def _bos_eos_from_config(
    tokenizer: Tokenizer, config: dict[str, Any], special: dict[str, Any]
) -> None:
    from tokenizers.processors import TemplateProcessing

    bos = special.get("bos_token") if config.get("add_bos_token", True) is True else None
    eos = special.get("eos_token") if config.get("add_eos_token", False) is True else None
    found = {t: tokenizer.token_to_id(t) for t in (bos, eos) if t is not None}
    marks = {t: i for t, i in found.items() if i is not None}
    single = [f"{t}:0" for t in (bos,) if t in marks] + ["$A:0"]
    single += [f"{t}:0" for t in (eos,) if t in marks]
    tokenizer.post_processor = TemplateProcessing(
        single=" ".join(single), special_tokens=list(marks.items())
    )


def _template_source(directory: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja beside the tokenizer (it wins, as in transformers), else the config's
    chat_template: a string, or named ones of which transformers takes `default`."""
    file = directory / "chat_template.jinja"
    if file.is_file():
        try:
            return file.read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"{file}: cannot read it ({exc}); fix or remove it") from None
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _compile(source: str, directory: Path) -> tuple[Template, bool]:
    """The template, and whether it loops over a message's content (vLLM then passes content
    as a list of text parts, else as one string)."""
    from jinja2 import TemplateSyntaxError

    env = _environment()
    try:
        tree = env.parse(source)
        template = env.from_string(tree)
    except TemplateSyntaxError as exc:
        raise TokenizerError(
            f"{directory}: the chat template does not compile (line {exc.lineno}: {exc.message}); "
            "fix tokenizer_config.json's chat_template or chat_template.jinja"
        ) from None
    return template, _loops_over_content(tree)


def _environment() -> Environment:
    """The environment transformers renders chat templates in."""
    from jinja2 import TemplateError, nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training; it
        renders as its body."""

        tags = {"generation"}  # noqa: RUF012 - jinja declares it an instance attribute

        def parse(self, parser: Any) -> nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:  # fmt: skip
        # Not jinja's own tojson, which escapes <, >, & and ' for HTML.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)  # fmt: skip

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _loops_over_content(tree: nodes.Template) -> bool:
    """Whether some `for x in message['content']` loops over an item of `messages` (or of a
    variable set from it, sliced or filtered): vLLM's test for its "openai" content format."""
    from jinja2 import nodes

    lists = {"messages"}
    sets = [(a.target.name, a.node) for a in tree.find_all(nodes.Assign)
            if isinstance(a.target, nodes.Name)]  # fmt: skip
    while grown := {name for name, value in sets if _reads(value) in lists} - lists:
        lists |= grown
    loops = [(f.target.name, f.iter) for f in tree.find_all(nodes.For)
             if isinstance(f.target, nodes.Name)]  # fmt: skip
    items = {name for name, iterable in loops if _reads(iterable) in lists}
    return any(_reads(iterable, key="content") in items for _, iterable in loops)


def _reads(node: nodes.Node | None, key: str | None = None) -> str | None:
    """The variable `node` reads through filters, tests and slices (with `key`: the variable
    whose `key` item or attribute it reads)."""
    from jinja2 import nodes

    while isinstance(node, nodes.Filter | nodes.Test) or (
        isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice)
    ):
        node = node.node
    if key is not None:
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            node = node.node if node.arg.value == key else None
        elif isinstance(node, nodes.Getattr):
            node = node.node if node.attr == key else None
        else:
            return None
    return node.name if isinstance(node, nodes.Name) and node.ctx == "load" else None


BYTES = BytesTokenizer()
TOKENIZER_FILES = ("tokenizer_config.json", "chat_template.jinja")  # read beside tokenizer.json


def load_tokenizer(spec: str) -> PromptTokenizer:
    """`bytes`, or the Hugging Face tokenizer at this path: loaded once per version of its
    files (a reload with the same files gets the same tokenizer)."""
    if spec == "bytes":
        return BYTES
    file = _tokenizer_file(Path(spec).expanduser())
    stamps = (_mtime_ns(file), *(_mtime_ns(file.parent / name) for name in TOKENIZER_FILES))
    return _load_unchanged(file, stamps)


@lru_cache(maxsize=8)
def _load_unchanged(file: Path, stamps: tuple[int | None, ...]) -> HfTokenizer:
    return HfTokenizer.load(file)


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None

"""Train `tiny-gpt` on the standard library's docstrings: the weights `infergate up` serves
(`replica/models/trained/tiny-gpt.pt`), so that a first completion reads like text.

Byte-level next-token prediction with AdamW on one CPU thread, in about four minutes, at the
size every replica serves by default (TinyGptParams). Files are read in sorted order and every
draw comes from one seeded generator: the same Python gives the same corpus, and the same torch
on the same machine the same weights. The training forward pass below runs the served model's
own modules without its paged KV cache; a unit test checks that both give the same logits.

    python -m replica.models.train_tiny_gpt --out replica/models/trained/tiny-gpt.pt
"""

from __future__ import annotations

import argparse
import ast
import math
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from replica.config import TinyGptParams
from replica.models.tiny_gpt import TinyGPT
from replica.models.tokenizer import BOS, VOCAB_SIZE, decode, encode

SKIPPED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3"})
SEPARATOR = b"\n\n"
SAMPLE_PROMPTS = ("The ", "Return the ", "def ")
SPREAD_FROM, LONG_FROM = 0.25, 0.85  # fractions of the steps: see shape()
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class Corpus:
    """Docstrings joined by blank lines; `starts`: where each begins (a window starts there)."""

    text: bytes
    starts: tuple[int, ...]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def docstrings(root: Path) -> Iterator[str]:
    """Every module, class and function docstring under `root`, files in sorted order; tests
    and third-party packages left out."""
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # a few files are deliberately broken or not UTF-8
            continue
        for node in ast.walk(tree):
            if isinstance(node, _DOCUMENTED) and (doc := ast.get_docstring(node)):
                yield doc


def build_corpus(root: Path) -> Corpus:
    text, starts = bytearray(), []
    for doc in docstrings(root):
        starts.append(len(text))
        text += doc.encode("utf-8") + SEPARATOR
    return Corpus(bytes(text), tuple(starts))


def causal_logits(
    model: TinyGPT, ids: torch.Tensor, first: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits at every position of `ids` [B, T], causal attention, no cache; row b's tokens sit
    at positions `first[b]` .. (None: 0 ..)."""
    positions = torch.arange(ids.shape[1])[None, :]
    x = model.tok(ids) + model.pos(positions if first is None else positions + first[:, None])
    for block in model._layers():
        q, k, v = model._split(block.qkv(block.ln1(x)))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + block.proj(model._merge(attended))
        x = x + block.mlp(block.ln2(x))
    logits: torch.Tensor = model.head(model.ln_f(x))
    return logits


def initialize(model: TinyGPT) -> TinyGPT:
    """GPT-2's start: small normal weights, zero biases; learns several times faster here than
    torch's defaults (embeddings ~ N(0, 1))."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    return model


def windows(data: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """[B, length + 1]: BOS, as every prompt begins, then the corpus bytes from each start."""
    rows = [data[s : s + length].long() for s in starts.tolist()]
    bos = torch.full((len(rows), 1), BOS, dtype=torch.long)
    return torch.cat([bos, torch.stack(rows)], dim=1)


def loss_on(model: TinyGPT, batch: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
    logits = causal_logits(model, batch[:, :-1], first)
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), batch[:, 1:].reshape(-1))


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then a cosine down to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    done = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


def split(corpus: Corpus, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Starts of windows of `length` bytes, for training and for the held-out last 2% of
    docstrings."""
    usable = [s for s in corpus.starts if s + length <= len(corpus.text)]
    cut = len(usable) * 49 // 50
    return torch.tensor(usable[:cut]), torch.tensor(usable[cut:])


def held_out_loss(model: TinyGPT, data: torch.Tensor, starts: torch.Tensor, length: int) -> float:
    """Mean loss over windows of `length` bytes at positions 0 .., as a prompt is served."""
    model.eval()
    with torch.inference_mode():
        losses = [loss_on(model, windows(data, chunk, length)) for chunk in torch.split(starts, 16)]
    model.train()
    return float(torch.stack(losses).mean())


def shape(step: int, args: argparse.Namespace) -> tuple[int, int, int]:
    """A step's windows: how many, how long, the last first position to draw. Short windows at
    position 0 learn the language fastest; then spread over the context, so every position's
    embedding is learnt; last, windows the context's length (the same bytes in fewer rows), so
    a long completion attends as it learnt to. Positions never trained or never attended
    across turn a long completion into noise."""
    context = TinyGptParams().context_len
    done = step / args.steps
    if done < SPREAD_FROM:
        return args.batch, args.seq_len, 0
    if done < LONG_FROM:
        return args.batch, args.seq_len, context - args.seq_len
    return max(1, args.batch * args.seq_len // context), context, 0


def train(args: argparse.Namespace) -> TinyGPT:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    corpus = build_corpus(args.stdlib)
    data = torch.frombuffer(bytearray(corpus.text), dtype=torch.uint8)
    context = TinyGptParams().context_len
    train_starts, held_out = split(corpus, context)
    print(f"corpus: {len(corpus.text):,} bytes, {len(corpus.starts):,} docstrings")
    model = initialize(TinyGPT(TinyGptParams())).train()  # the served shape, for its state dict
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
    began = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        rows, length, last_first = shape(step, args)
        picks = torch.randint(len(train_starts), (rows,), generator=generator)
        first = torch.randint(last_first + 1, (rows,), generator=generator)
        loss = loss_on(model, windows(data, train_starts[picks], length), first)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - began
            print(f"step {step:5d}  loss {loss.item():.3f}  {elapsed:6.1f} s", flush=True)
    trained_s = time.perf_counter() - began
    for length in (args.seq_len, context):
        loss_held_out = held_out_loss(model, data, held_out, length)
        print(f"held-out loss, {length}-byte windows at position 0: {loss_held_out:.3f}")
    print(f"trained in {trained_s:.0f} s")
    return model.eval()


def greedy(model: TinyGPT, prompt: str, tokens: int) -> str:
    """The most likely continuation, as a temperature-0 request gets it from the replica."""
    ids = list(encode(prompt))
    with torch.inference_mode():
        for _ in range(tokens):
            logits = causal_logits(model, torch.tensor([ids]))[0, -1, :BOS]  # never BOS
            ids.append(int(logits.argmax()))
    return decode(ids[len(encode(prompt)) :])


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the state dict goes")
    parser.add_argument("--stdlib", type=Path, default=stdlib_root(), help="text source")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not 0 < args.seq_len <= TinyGptParams().context_len:
        raise SystemExit(f"--seq-len: 1 .. {TinyGptParams().context_len} (the served context)")
    torch.set_num_threads(1)  # "a few minutes on one core" is the promise; keep it honest
    model = train(args)
    for prompt in SAMPLE_PROMPTS:
        print(f"greedy: {prompt + greedy(model, prompt, 64)!r}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

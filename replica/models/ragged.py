"""One engine step as one forward pass over ragged rows: where each new token goes and which rows
attend together (`tiny_gpt.TinyGPT.forward_chunks` runs it).

A step computes a chunk of new tokens for each of several sequences: one decode token for most,
a prompt chunk for a few. Their tokens are laid end to end in one flat batch, so the linear
layers see no padding. Attention runs per group of rows of like shape (chunk length and key
span within 2x of the group's longest), so a short row batched with a long one reads about its
own keys, not the long one's. A group's keys are gathered from the paged KV pool block by block
(a row's whole blocks, so up to `block_size - 1` keys past its end, masked); its queries see
their own row's positions up to their own.

Every index the pass needs is built here in plain Python and crosses to torch as one buffer, so a
step costs a few small tensor ops per group instead of a few per row.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from math import inf
from typing import Protocol

import torch

# A row joins the current group while its chunk length and key span are at least half the
# group's first (longest) row's: at most 2x padding, few groups.
_PAD = 2


class ChunkLike(Protocol):
    """What a step computes for one sequence (`Chunk`, or the engine's `Work` as it is)."""

    @property
    def tokens(self) -> tuple[int, ...]: ...
    @property
    def start(self) -> int: ...
    @property
    def blocks(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class Chunk:
    """New tokens of one sequence, at positions `start ..`; `blocks` cover them all."""

    tokens: tuple[int, ...]
    start: int
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class Group:
    """Rows attending together: `rows` x `queries` query slots (right-padded) over `keys` keys.
    Its tokens are the flat batch's `first ..`; `gather` (query slot -> flat token) and
    `scatter` (real query slots) are set only when its rows are padded."""

    rows: int
    queries: int
    keys: int  # whole blocks: columns * block_size
    first: int
    blocks: torch.Tensor  # [rows * columns]: each row's block table, padded
    mask: torch.Tensor  # [rows, 1, queries, keys]: 0 where the query sees the key, else -inf
    gather: torch.Tensor | None
    scatter: torch.Tensor | None


@dataclass(frozen=True)
class Layout:
    ids: torch.Tensor  # [N] token ids, flat
    positions: torch.Tensor  # [N] for the position embedding (clamped to the context)
    write: torch.Tensor  # [N] pool slot each new token's key/value goes to
    last: torch.Tensor  # [B] flat index of each chunk's last token, in the chunks' order
    groups: tuple[Group, ...]


def grouped(chunks: Sequence[ChunkLike]) -> list[list[int]]:
    """Chunk indices by group: longest first, a new group when a row is under half the
    group's first row in chunk length or key span (so decode rows never share a group with a
    prompt chunk)."""
    shapes = [(len(c.tokens), c.start + len(c.tokens)) for c in chunks]
    groups: list[list[int]] = []
    head_len = head_end = 0
    for i in sorted(range(len(chunks)), key=shapes.__getitem__, reverse=True):
        length, end = shapes[i]
        if groups and length * _PAD > head_len and end * _PAD > head_end:
            groups[-1].append(i)
        else:
            groups.append([i])
            head_len, head_end = length, end
    return groups


@dataclass
class _GroupPlan:
    """A group's shape and where its index lists start in the step's buffer."""

    rows: int
    queries: int
    columns: int
    keys: int
    first: int
    tokens: int
    tables: int
    query_positions: int
    gather: int | None = None
    scatter: int | None = None


class _Builder:
    """Every index of a step in plain Python: the flat tokens' ids, positions and pool slots,
    each chunk's last token, and per group its block tables and query positions (and, when its
    rows are padded, where each query slot comes from). All of it crosses to torch as one
    buffer (`torch.frombuffer`: no copy), then is sliced."""

    def __init__(self, chunks: Sequence[ChunkLike], block_size: int, context_len: int) -> None:
        self.chunks = chunks
        self.block_size = block_size
        self.top = context_len - 1  # the position embedding's last row
        self.ids: array[int] = array("q")
        self.positions: array[int] = array("q")
        self.write: array[int] = array("q")
        self.last = [0] * len(chunks)
        self.extra: array[int] = array("q")
        self.groups: list[_GroupPlan] = []

    def add_group(self, rows: list[int]) -> None:
        chunks, bs = self.chunks, self.block_size
        queries = max(len(chunks[i].tokens) for i in rows)
        columns = -(-max(chunks[i].start + len(chunks[i].tokens) for i in rows) // bs)
        tables: array[int] = array("q")
        query_positions: array[int] = array("q")
        first = len(self.ids)
        for i in rows:
            chunk = chunks[i]
            blocks = chunk.blocks[:columns]
            tables.extend(blocks)
            if len(blocks) < columns:  # never visible: beyond the row's end
                tables.extend([0] * (columns - len(blocks)))
            self._tokens(chunk, query_positions, queries)
            self.last[i] = len(self.ids) - 1
        tokens = len(self.ids) - first
        plan = _GroupPlan(
            len(rows), queries, columns, columns * bs, first, tokens, len(self.extra), 0
        )
        self.extra.extend(tables)
        plan.query_positions = len(self.extra)
        self.extra.extend(query_positions)
        if tokens < len(rows) * queries:
            self._padding(plan, [len(chunks[i].tokens) for i in rows])
        self.groups.append(plan)

    def _tokens(self, chunk: ChunkLike, query_positions: array[int], queries: int) -> None:
        tokens, start, blocks, bs = chunk.tokens, chunk.start, chunk.blocks, self.block_size
        if len(tokens) == 1:  # a decode row: most rows of most steps
            self.ids.append(tokens[0])
            self.positions.append(min(start, self.top))
            self.write.append(blocks[start // bs] * bs + start % bs)
            query_positions.append(start)
            return
        end = start + len(tokens)
        self.ids.extend(tokens)
        self.positions.extend(range(start, min(end, self.top + 1)))
        self.positions.extend([self.top] * (end - max(start, self.top + 1)))
        position = start
        while position < end:
            block, offset = divmod(position, bs)
            run = min(bs - offset, end - position)
            base = blocks[block] * bs + offset
            self.write.extend(range(base, base + run))
            position += run
        query_positions.extend(range(start, end))
        query_positions.extend([end - 1] * (queries - len(tokens)))  # padding: copies the last

    def _padding(self, plan: _GroupPlan, lengths: list[int]) -> None:
        """Rows of unlike length: each query slot's flat token (a padded slot repeats its row's
        last) and the real slots of the output."""
        gather: list[int] = []
        scatter: list[int] = []
        token, queries = plan.first, plan.queries
        for row, real in enumerate(lengths):
            gather += [token + min(t, real - 1) for t in range(queries)]
            scatter += range(row * queries, row * queries + real)
            token += real
        plan.gather = len(self.extra)
        self.extra.extend(gather)
        plan.scatter = len(self.extra)
        self.extra.extend(scatter)

    def send(self, dtype: torch.dtype, device: torch.device) -> Layout:
        n, b = len(self.ids), len(self.chunks)
        values = self.ids
        offset = len(values) + 2 * n + b  # where `extra` starts
        values.extend(self.positions)
        values.extend(self.write)
        values.extend(self.last)
        values.extend(self.extra)
        sent = torch.frombuffer(values, dtype=torch.int64)
        if device.type != "cpu":
            sent = sent.to(device, non_blocking=True)
        keys = torch.arange(max(g.keys for g in self.groups), device=device)
        groups = tuple(_group(g, sent[offset:], keys, dtype) for g in self.groups)
        return Layout(
            sent[:n], sent[n : 2 * n], sent[2 * n : 3 * n], sent[3 * n : 3 * n + b], groups
        )


def layout(
    chunks: Sequence[ChunkLike], block_size: int, context_len: int, dtype: torch.dtype,
    device: torch.device,
) -> Layout:  # fmt: skip
    builder = _Builder(chunks, block_size, context_len)
    for rows in grouped(chunks):
        builder.add_group(rows)
    return builder.send(dtype, device)


def _group(plan: _GroupPlan, extra: torch.Tensor, keys: torch.Tensor, dtype: torch.dtype) -> Group:
    rows, queries = plan.rows, plan.queries
    tables = extra[plan.tables : plan.tables + rows * plan.columns]
    at = plan.query_positions
    query_positions = extra[at : at + rows * queries].view(rows, 1, queries, 1)
    hidden = keys[: plan.keys] > query_positions  # [rows, 1, queries, keys]
    mask = torch.zeros(hidden.shape, dtype=dtype, device=keys.device).masked_fill_(hidden, -inf)
    gather = scatter = None
    if plan.gather is not None and plan.scatter is not None:
        gather = extra[plan.gather : plan.gather + rows * queries]
        scatter = extra[plan.scatter : plan.scatter + plan.tokens]
    return Group(rows, queries, plan.keys, plan.first, tables, mask, gather, scatter)

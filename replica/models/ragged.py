"""One engine step as one forward pass over ragged rows: where each new token goes and which rows
attend together (`tiny_gpt.TinyGPT.forward_chunks` runs it).

A step computes a chunk of new tokens for each of several sequences: one decode token for most,
a prompt chunk for a few. Their tokens are laid end to end in one flat batch, so the linear
layers see no padding. Attention runs per group of rows of like shape (chunk length and key
span within 2x of the group's longest), so a short row batched with a long one reads about its
own keys, not the long one's. A group's keys are gathered from the paged KV pool block by block
(a row's whole blocks, so up to `block_size - 1` keys past its end, masked); its queries see
their own row's positions up to their own.

The last layer computes only what the logits need: every token's keys and values, but attention
and the MLP for each chunk's last token alone (a prompt chunk's other tokens have no use past
their keys and values), so it has its own groups: one query per chunk.

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
    groups: tuple[Group, ...]
    # the last layer: its groups, the flat tokens it keeps (None: all, when every chunk is one
    # token) and each chunk's row in its output (None: the chunks' own order)
    final_groups: tuple[Group, ...]
    keep: torch.Tensor | None
    order: torch.Tensor | None


def grouped(shapes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Row indices by group, from each row's (queries, key span): longest first, a new group
    when a row is under half the group's first row in either (so decode rows never share a
    group with a prompt chunk)."""
    groups: list[list[int]] = []
    head_len = head_end = 0
    for i in sorted(range(len(shapes)), key=shapes.__getitem__, reverse=True):
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
    first: int
    tokens: int
    tables: int
    query_positions: int = 0
    gather: int | None = None
    scatter: int | None = None


class _Builder:
    """Every index of a step in plain Python: the flat tokens' ids, positions and pool slots,
    and per group its block tables and query positions (and, when its rows are padded, where
    each query slot comes from). All of it crosses to torch as one buffer (`torch.frombuffer`:
    no copy), then is sliced."""

    def __init__(self, chunks: Sequence[ChunkLike], block_size: int, context_len: int) -> None:
        self.chunks = chunks
        self.block_size = block_size
        self.top = context_len - 1  # the position embedding's last row
        self.ids: array[int] = array("q")
        self.positions: array[int] = array("q")
        self.write: array[int] = array("q")
        self.last = [0] * len(chunks)  # flat index of each chunk's last token
        self.extra: array[int] = array("q")  # the groups' lists
        self.groups: list[_GroupPlan] = []
        self.final: list[_GroupPlan] | None = None  # None: the same groups
        self.keep: list[int] = []
        self.order: list[int] | None = None

    def build(self) -> None:
        chunks = self.chunks
        shapes = [(len(c.tokens), c.start + len(c.tokens)) for c in chunks]
        for rows in grouped(shapes):
            first = len(self.ids)
            for i in rows:
                self._tokens(chunks[i])
                self.last[i] = len(self.ids) - 1
            self.groups.append(self._plan([chunks[i] for i in rows], first, last_only=False))
        if len(self.ids) > len(chunks):  # a prompt chunk: the last layer takes last tokens only
            self.final, self.order = [], [0] * len(chunks)
            for rows in grouped([(1, end) for _, end in shapes]):
                first = len(self.keep)
                for i in rows:
                    self.order[i] = len(self.keep)
                    self.keep.append(self.last[i])
                self.final.append(self._plan([chunks[i] for i in rows], first, last_only=True))
        elif self.last != list(range(len(chunks))):
            self.order = self.last

    def _tokens(self, chunk: ChunkLike) -> None:
        tokens, start, blocks, bs = chunk.tokens, chunk.start, chunk.blocks, self.block_size
        if len(tokens) == 1:  # a decode row: most rows of most steps
            self.ids.append(tokens[0])
            self.positions.append(min(start, self.top))
            self.write.append(blocks[start // bs] * bs + start % bs)
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

    def _plan(self, rows: list[ChunkLike], first: int, *, last_only: bool) -> _GroupPlan:
        """Block tables and query positions of a group whose queries are its rows' tokens, or
        (`last_only`) each row's last token."""
        lengths = [1 if last_only else len(c.tokens) for c in rows]
        queries = max(lengths)
        columns = -(-max(c.start + len(c.tokens) for c in rows) // self.block_size)
        tables: array[int] = array("q")
        query_positions: array[int] = array("q")
        for chunk, length in zip(rows, lengths, strict=True):
            blocks = chunk.blocks[:columns]
            tables.extend(blocks)
            if len(blocks) < columns:  # never visible: beyond the row's end
                tables.extend([0] * (columns - len(blocks)))
            end = chunk.start + len(chunk.tokens)
            query_positions.extend(range(end - length, end))
            query_positions.extend([end - 1] * (queries - length))  # padding: copies the last
        plan = _GroupPlan(len(rows), queries, columns, first, sum(lengths), len(self.extra))
        self.extra.extend(tables)
        plan.query_positions = len(self.extra)
        self.extra.extend(query_positions)
        if plan.tokens < len(rows) * queries:
            self._padding(plan, lengths)
        return plan

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
        n, keep, order = len(self.ids), len(self.keep), self.order or []
        values = self.ids
        for part in (self.positions, self.write, self.keep, order):
            values.extend(part)
        values.extend(self.extra)
        sent = torch.frombuffer(values, dtype=torch.int64)
        if device.type != "cpu":
            sent = sent.to(device, non_blocking=True)
        sizes = [n, n, n, keep, len(order), len(self.extra)]
        ids, positions, write, kept, ordered, extra = torch.split(sent, sizes)
        span = max(g.columns for g in [*self.groups, *(self.final or ())]) * self.block_size
        keys = torch.arange(span, device=device)
        groups = tuple(self._group(g, extra, keys, dtype) for g in self.groups)
        final = groups if self.final is None else tuple(
            self._group(g, extra, keys, dtype) for g in self.final
        )  # fmt: skip
        return Layout(
            ids, positions, write, groups, final,
            kept if self.final is not None else None, ordered if self.order else None,
        )  # fmt: skip

    def _group(
        self, plan: _GroupPlan, extra: torch.Tensor, keys: torch.Tensor, dtype: torch.dtype
    ) -> Group:
        rows, queries, span = plan.rows, plan.queries, plan.columns * self.block_size
        tables = extra[plan.tables : plan.tables + rows * plan.columns]
        at = plan.query_positions
        query_positions = extra[at : at + rows * queries].view(rows, 1, queries, 1)
        hidden = keys[:span] > query_positions  # [rows, 1, queries, keys]
        mask = torch.zeros(hidden.shape, dtype=dtype, device=keys.device).masked_fill_(hidden, -inf)
        gather = scatter = None
        if plan.gather is not None and plan.scatter is not None:
            gather = extra[plan.gather : plan.gather + rows * queries]
            scatter = extra[plan.scatter : plan.scatter + plan.tokens]
        return Group(rows, queries, span, plan.first, tables, mask, gather, scatter)


def layout(
    chunks: Sequence[ChunkLike], block_size: int, context_len: int, dtype: torch.dtype,
    device: torch.device,
) -> Layout:  # fmt: skip
    builder = _Builder(chunks, block_size, context_len)
    builder.build()
    return builder.send(dtype, device)

"""The `tiny-gpt` model: a small GPT-style decoder over byte tokens, with a paged KV cache.

`forward` computes a chunk of new tokens for each of several sequences, each at its own
positions. Keys and values live in one `KVPool` of fixed-size blocks (`replica/kv.py`); a row's
block table says where its earlier positions are, so a cached prefix shared by many sequences
is stored once and never recomputed. Queries attend causally to their own row's positions only,
so a sequence's logits do not depend on its batch-mates or on how its prompt was chunked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from replica.config import TinyGptParams
from replica.models.tokenizer import VOCAB_SIZE
from replica.models.weights import build

# Rows attending to keys of similar span: their rows (None: all), slots, gathered shape, mask.
_Group = tuple[torch.Tensor | None, torch.Tensor, tuple[int, ...], torch.Tensor]


class KVPool:
    """Keys and values of every block: [layers, num_blocks * block_size, heads, head_dim] each;
    token slot `block * block_size + offset`."""

    def __init__(self, model: TinyGPT, num_blocks: int, block_size: int) -> None:
        p, weight = model.params, model.head.weight
        shape = (p.layers, num_blocks * block_size, model.heads, model.head_dim)
        self.keys = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        self.values = torch.zeros_like(self.keys)
        self.block_size = block_size


@dataclass(frozen=True)
class Chunk:
    """New tokens of one sequence, at positions `start ..`; `blocks` cover them all."""

    tokens: tuple[int, ...]
    start: int
    blocks: tuple[int, ...]


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )


class TinyGPT(nn.Module):
    def __init__(self, params: TinyGptParams) -> None:
        super().__init__()
        self.params = params
        self.heads = params.heads
        self.head_dim = params.width // params.heads
        self.tok = nn.Embedding(VOCAB_SIZE, params.width)
        self.pos = nn.Embedding(params.context_len, params.width)
        self.blocks = nn.ModuleList(Block(params.width) for _ in range(params.layers))
        self.ln_f = nn.LayerNorm(params.width)
        self.head = nn.Linear(params.width, VOCAB_SIZE, bias=False)

    def _layers(self) -> list[Block]:
        return [cast(Block, block) for block in self.blocks]

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, length, _ = qkv.shape
        parts = qkv.view(b, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return parts[0], parts[1], parts[2]  # each [B, H, L, hd]

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(b, length, self.params.width)

    def forward_chunks(self, chunks: list[Chunk], pool: KVPool) -> torch.Tensor:
        """Write each chunk's keys/values into its blocks and return the logits after each
        chunk's last token [B, V]. Rows are right-padded to the longest chunk; padding is
        never written and never attended to."""
        device = self.head.weight.device
        bs = pool.block_size
        lengths = torch.tensor([len(c.tokens) for c in chunks], device=device)
        starts = torch.tensor([c.start for c in chunks], device=device)
        width, span = int(lengths.max()), int((starts + lengths).max())
        ids = torch.zeros(len(chunks), width, dtype=torch.long, device=device)
        columns = max(-(-span // bs), *(len(c.blocks) for c in chunks))
        tables = torch.zeros(len(chunks), columns, dtype=torch.long, device=device)
        for row, chunk in enumerate(chunks):
            ids[row, : len(chunk.tokens)] = torch.tensor(chunk.tokens, device=device)
            tables[row, : len(chunk.blocks)] = torch.tensor(chunk.blocks, device=device)
        offsets = torch.arange(width, device=device)
        positions = starts[:, None] + offsets[None, :]  # [B, T]
        real = offsets[None, :] < lengths[:, None]  # [B, T]
        keys_at = torch.arange(span, device=device)
        slots = tables[:, keys_at // bs] * bs + keys_at % bs  # [B, S]: where position j lives
        write_rows, write_cols = real.nonzero(as_tuple=True)
        write_slots = slots[write_rows, positions[write_rows, write_cols]]
        ends = starts + lengths
        visible = (keys_at[None, None, :] <= positions[:, :, None]) & (
            keys_at < ends[:, None, None]
        )
        clamped = positions.clamp(max=self.params.context_len - 1)
        x = self.tok(ids) + self.pos(clamped)
        groups = self._span_groups(ends, slots, visible)
        for layer, block in enumerate(self._layers()):
            q, k, v = self._split(block.qkv(block.ln1(x)))  # [B, H, T, hd]
            pool.keys[layer].index_copy_(0, write_slots, k.transpose(1, 2)[write_rows, write_cols])
            pool.values[layer].index_copy_(
                0, write_slots, v.transpose(1, 2)[write_rows, write_cols]
            )
            attended = q if len(groups) == 1 else torch.empty_like(q)
            for rows_of, read, shape, mask in groups:
                keys = pool.keys[layer].index_select(0, read).view(shape).transpose(1, 2)
                values = pool.values[layer].index_select(0, read).view(shape).transpose(1, 2)
                mine = q if rows_of is None else q.index_select(0, rows_of)
                out = F.scaled_dot_product_attention(mine, keys, values, attn_mask=mask)
                attended = out if rows_of is None else attended.index_copy_(0, rows_of, out)
            x = x + block.proj(self._merge(attended))
            x = x + block.mlp(block.ln2(x))
        rows = torch.arange(len(chunks), device=device)
        logits: torch.Tensor = self.head(self.ln_f(x[rows, lengths - 1]))
        return logits

    def _span_groups(
        self, ends: torch.Tensor, slots: torch.Tensor, visible: torch.Tensor
    ) -> list[_Group]:
        """Rows grouped by how many keys they attend to, in powers of two, so a short sequence
        batched with a long one gathers its own keys, not the long one's (at most 2x padding).
        Each group: its rows (None: all), the slots to gather, their shape, its mask."""
        by_bucket: dict[int, list[int]] = {}
        for row, end in enumerate(ends.tolist()):
            by_bucket.setdefault((end - 1).bit_length(), []).append(row)
        groups: list[_Group] = []
        for rows in by_bucket.values():
            index = torch.tensor(rows, device=ends.device)
            span = int(ends[index].max())
            shape = (len(rows), span, self.heads, self.head_dim)
            read = slots[index, :span].reshape(-1)  # index_select: ~5x faster than [] on CPU
            mask = visible[index, :, :span][:, None]  # [b, 1, T, span]
            groups.append((None if len(by_bucket) == 1 else index, read, shape, mask))
        return groups


def build_tiny_gpt(params: TinyGptParams, device: torch.device) -> TinyGPT:
    model = build(lambda: TinyGPT(params), params.seed, params.weights_path, device)
    return model.double() if params.dtype == "float64" else model

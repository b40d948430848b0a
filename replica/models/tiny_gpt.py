"""The `tiny-gpt` model: a small GPT-style decoder over byte tokens, with a paged KV cache.

`forward_chunks` computes a chunk of new tokens for each of several sequences, each at its own
positions, in one pass: decode tokens and prompt chunks together (`replica/models/ragged.py`
lays them out). Keys and values live in one `KVPool` of fixed-size blocks (`replica/kv.py`); a
row's block table says where its earlier positions are, so a cached prefix shared by many
sequences is stored once and never recomputed. Queries attend causally to their own row's
positions only, so a sequence's logits do not depend on its batch-mates or on how its prompt was
chunked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from replica.config import TinyGptParams
from replica.models.ragged import Chunk, ChunkLike, Group, layout
from replica.models.tokenizer import VOCAB_SIZE
from replica.models.weights import build

__all__ = ["Chunk", "KVPool", "TinyGPT", "build_tiny_gpt"]


class KVPool:
    """Keys and values of every token slot, side by side so one index reads or writes both:
    `kv[layer]` is [num_blocks * block_size, 2 (key, value), heads, head_dim]; token slot
    `block * block_size + offset`."""

    def __init__(self, model: TinyGPT, num_blocks: int, block_size: int) -> None:
        p, weight = model.params, model.head.weight
        shape = (p.layers, num_blocks * block_size, 2, model.heads, model.head_dim)
        self.kv = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        self.block_size = block_size

    def blocks(self, layer: int) -> torch.Tensor:
        """One layer's pool as [num_blocks, block_size, 2, heads, head_dim] (a view)."""
        kv = self.kv[layer]
        return kv.view(-1, self.block_size, *kv.shape[1:])


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

    def forward_chunks(self, chunks: Sequence[ChunkLike], pool: KVPool) -> torch.Tensor:
        """Write each chunk's keys/values into its blocks and return the logits after each
        chunk's last token [B, V], in the chunks' order."""
        weight = self.head.weight
        step = layout(chunks, pool.block_size, self.params.context_len, weight.dtype, weight.device)
        x = self.tok(step.ids) + self.pos(step.positions)  # [N, width]: every row's tokens
        *inner, final = self._layers()
        for layer, block in enumerate(inner):
            x = self._layer(block, x, pool, layer, step.write, step.groups)
        x = self._layer(final, x, pool, len(inner), step.write, step.final_groups, step.keep)
        logits: torch.Tensor = self.head(self.ln_f(x))
        return logits if step.order is None else logits.index_select(0, step.order)

    def _layer(
        self, block: Block, x: torch.Tensor, pool: KVPool, layer: int, write: torch.Tensor,
        groups: tuple[Group, ...], keep: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """One block: every token's keys/values into the pool; the rest for the tokens `keep`
        names (all when None)."""
        qkv = block.qkv(block.ln1(x)).view(-1, 3, self.heads, self.head_dim)
        pool.kv[layer].index_copy_(0, write, qkv[:, 1:])
        q = qkv[:, 0]
        if keep is not None:
            q, x = q.index_select(0, keep), x.index_select(0, keep)
        x = x + block.proj(self._attend(q, pool.blocks(layer), groups))
        out: torch.Tensor = x + block.mlp(block.ln2(x))
        return out

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, groups: tuple[Group, ...]) -> torch.Tensor:
        """Attention of the flat queries [N, heads, head_dim] over the pool's blocks
        [num_blocks, block_size, 2, heads, head_dim], group by group, as [N, width]."""
        outs = []
        for g in groups:
            both = kv.index_select(0, g.blocks).view(g.rows, g.keys, 2, self.heads, self.head_dim)
            keys, values = both[:, :, 0].transpose(1, 2), both[:, :, 1].transpose(1, 2)
            n = g.rows * g.queries
            mine = q[g.first : g.first + n] if g.gather is None else q.index_select(0, g.gather)
            mine = mine.view(g.rows, g.queries, self.heads, self.head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(mine, keys, values, attn_mask=g.mask)
            out = out.transpose(1, 2).reshape(n, self.params.width)
            outs.append(out if g.scatter is None else out.index_select(0, g.scatter))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def build_tiny_gpt(params: TinyGptParams, device: torch.device) -> TinyGPT:
    model = build(lambda: TinyGPT(params), params.seed, params.weights_path, device)
    return model.double() if params.dtype == "float64" else model

"""The `tiny-gpt` model: a small GPT-style decoder over byte tokens, with a per-sequence KV cache.

`prefill` runs right-padded prompts through a causal mask (padding sits after every real token,
so it never changes a real position's result) and fills one `KVCache` per sequence.
`decode` feeds one token per sequence; caches of different lengths are stacked and masked, so a
sequence's logits do not depend on its batch-mates.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from replica.config import TinyGptParams
from replica.models.tokenizer import VOCAB_SIZE
from replica.models.weights import build


class KVCache:
    """One sequence's keys/values, shape [2, layers, heads, context_len, head_dim]."""

    def __init__(self, buf: torch.Tensor) -> None:
        self.buf = buf
        self.length = 0


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

    def new_cache(self) -> KVCache:
        p = self.params
        shape = (2, p.layers, self.heads, p.context_len, self.head_dim)
        weight = self.head.weight
        return KVCache(torch.empty(shape, device=weight.device, dtype=weight.dtype))

    def prefill(self, prompts: list[tuple[int, ...]]) -> tuple[torch.Tensor, list[KVCache]]:
        """Logits for each prompt's next token [B, V], and each prompt's filled cache."""
        device = self.head.weight.device
        lengths = [len(p) for p in prompts]
        ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt, device=device)
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=device))
        caches = [self.new_cache() for _ in prompts]
        for layer, block in enumerate(self._layers()):
            q, k, v = self._split(block.qkv(block.ln1(x)))
            x = x + block.proj(self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)))
            x = x + block.mlp(block.ln2(x))
            for row, (cache, n) in enumerate(zip(caches, lengths, strict=True)):
                cache.buf[0, layer, :, :n] = k[row, :, :n]
                cache.buf[1, layer, :, :n] = v[row, :, :n]
        for cache, n in zip(caches, lengths, strict=True):
            cache.length = n
        last = torch.tensor(lengths, device=device) - 1
        rows = torch.arange(len(prompts), device=device)
        return self.head(self.ln_f(x[rows, last])), caches

    def decode(self, tokens: list[int], caches: list[KVCache]) -> torch.Tensor:
        """Feed one token per sequence at its own position; returns next-token logits [B, V]."""
        device = self.head.weight.device
        lens = torch.tensor([c.length for c in caches], device=device)
        span = int(lens.max().item()) + 1
        kv = torch.stack([c.buf[:, :, :, :span] for c in caches])  # [B, 2, layers, H, span, hd]
        rows = torch.arange(len(caches), device=device)
        mask = (torch.arange(span, device=device)[None, :] <= lens[:, None])[:, None, None, :]
        x = (self.tok(torch.tensor(tokens, device=device)) + self.pos(lens))[:, None, :]
        for layer, block in enumerate(self._layers()):
            q, k, v = self._split(block.qkv(block.ln1(x)))
            keys, values = kv[:, 0, layer], kv[:, 1, layer]
            keys[rows, :, lens] = k[:, :, 0]
            values[rows, :, lens] = v[:, :, 0]
            attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            x = x + block.proj(self._merge(attended))
            x = x + block.mlp(block.ln2(x))
        new = kv[rows, :, :, :, lens]  # [B, 2, layers, H, hd]
        for row, cache in enumerate(caches):
            cache.buf[:, :, :, cache.length] = new[row]
            cache.length += 1
        logits: torch.Tensor = self.head(self.ln_f(x[:, 0]))
        return logits


def build_tiny_gpt(params: TinyGptParams, device: torch.device) -> TinyGPT:
    model = build(lambda: TinyGPT(params), params.seed, params.weights_path, device)
    return model.double() if params.dtype == "float64" else model

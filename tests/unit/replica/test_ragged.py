"""One forward pass over ragged rows (replica/models/ragged.py): how rows are grouped, and that a
row's logits and keys/values are those it gets alone, whatever it is batched with (float64)."""

from __future__ import annotations

import pytest
import torch

from replica.config import TinyGptParams
from replica.models.ragged import Chunk, grouped, layout
from replica.models.tiny_gpt import KVPool, TinyGPT

BLOCK = 16


def chunk(tokens: int, start: int, first_block: int) -> Chunk:
    ids = tuple(32 + (start + i) * 7 % 95 for i in range(tokens))
    blocks = tuple(range(first_block, first_block + -(-(start + tokens) // BLOCK)))
    return Chunk(ids, start, blocks)


def test_rows_group_within_twice_the_longest_and_decodes_apart_from_prompt_chunks() -> None:
    decodes = [chunk(1, start, 0) for start in (40, 60, 120, 200, 340)]
    prompt = chunk(45, 0, 0)
    groups = grouped([(len(c.tokens), c.start + len(c.tokens)) for c in [*decodes, prompt]])
    assert groups == [[5], [4, 3], [2, 1], [0]]  # longest first; 61 > 200 / 2 starts anew
    assert grouped([(8, 8), (5, 5), (3, 3)]) == [[0, 1], [2]]


def test_a_step_is_one_tensor_buffer_with_padded_groups_marked() -> None:
    chunks = [chunk(8, 0, 0), chunk(5, 3, 4), chunk(1, 30, 8)]
    step = layout(chunks, BLOCK, 512, torch.float64, torch.device("cpu"))
    assert step.ids.tolist() == [*chunks[0].tokens, *chunks[1].tokens, *chunks[2].tokens]
    assert step.write.tolist() == [*range(8), *range(4 * 16 + 3, 4 * 16 + 8), 9 * 16 + 14]
    assert step.keep is not None and step.order is not None
    assert step.keep.tolist() == [13, 7, 12]  # the last layer: last tokens, longest span first
    assert step.order.tolist() == [1, 2, 0]
    padded, decode = step.groups
    assert (padded.rows, padded.queries, padded.keys) == (2, 8, 16)
    assert padded.gather is not None and padded.scatter is not None
    assert padded.gather.tolist() == [*range(8), *range(8, 13), 12, 12, 12]
    assert padded.scatter.tolist() == [*range(8), *range(8, 13)]
    assert (decode.rows, decode.queries, decode.keys, decode.gather) == (1, 1, 32, None)
    assert decode.mask[0, 0, 0].isinf().tolist() == [False] * 31 + [True]


def model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(TinyGptParams(context_len=512, dtype="float64")).double().eval()


# (tokens already in the cache, new tokens): decodes at unlike contexts, a prompt chunk after a
# prefix, a whole prompt, and two chunks of unlike length that share a padded group
ROWS = [(40, 1), (61, 1), (200, 1), (340, 1), (32, 45), (0, 20), (0, 13), (5, 7)]


@pytest.mark.parametrize("order", ["as listed", "reversed"])
def test_every_row_gets_what_it_gets_alone(order: str) -> None:
    gpt = model()
    rows = ROWS if order == "as listed" else ROWS[::-1]
    chunks, prefixes = [], []
    for index, (cached, new) in enumerate(rows):
        full = chunk(cached + new, 0, index * 32)
        prefixes.append(Chunk(full.tokens[:cached], 0, full.blocks))
        chunks.append(Chunk(full.tokens[cached:], cached, full.blocks))
    together, alone = KVPool(gpt, 8 * 32, BLOCK), KVPool(gpt, 8 * 32, BLOCK)
    with torch.inference_mode():
        for prefix in prefixes:
            if prefix.tokens:
                for pool in (together, alone):
                    gpt.forward_chunks([prefix], pool)
        batched = gpt.forward_chunks(chunks, together)
        single = torch.cat([gpt.forward_chunks([c], alone) for c in chunks])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-12)
    assert batched.argmax(-1).tolist() == single.argmax(-1).tolist()
    torch.testing.assert_close(together.kv, alone.kv, rtol=0, atol=1e-12)

"""What `precise_prefix` costs per request to key a prompt's blocks from the engine's tokens:
tokenizing in the gateway (gateway/routing/tokens.py) and hashing the blocks (prefix.chain).

    python -m loadtests.tokenize_bench [--tokens 500,2000,8000] [--repeats 300] [--vocab 32000]

No model files are downloaded: a byte-level BPE of `--vocab` tokens is trained here (the
`tokenizers` library) on seeded English-like text, with a ChatML chat template, laid out as a
model repository has it. Each case is one chat request (a system prompt of about N tokens and a
short question) through the same code the gateway runs: the Hugging Face tokenizer (template
render + encode) and the byte tokenizer (our replicas'), each followed by hashing the first
`prefix_length` (4,096) tokens in blocks of 16. Printed: P50 and P99 over `--repeats` calls of
each step, in milliseconds, from raw per-call samples (time.perf_counter), single-threaded on
this machine, with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from gateway.routing.prefix import chain
from gateway.routing.tokens import BYTES, HfTokenizer

TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYLLABLES = ["ka", "to", "ri", "men", "sal", "or", "ve", "lin", "dra", "qu", "est", "pho", "nu"]


def words(rng: random.Random, n: int) -> str:
    return " ".join(
        "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(n)
    )


def write_model(directory: Path, vocab: int, seed: int) -> Path:
    rng = random.Random(seed)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((words(rng, 200) for _ in range(5000)), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 0)]
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def timed(step: Callable[[], Any], repeats: int) -> np.ndarray:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return np.array(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.tokenize_bench")
    parser.add_argument("--tokens", default="500,2000,8000")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hf = HfTokenizer.load(write_model(Path(tmp), args.vocab, args.seed))
        rng = random.Random(args.seed + 1)
        print(f"CPU: {platform.processor() or platform.machine()}, vocab {args.vocab}, "
              f"{args.repeats} calls per cell, ms per request")  # fmt: skip
        print("| prompt tokens (HF) | HF tokenize P50 | P99 | bytes tokenize P50 | P99 | "
              "hash 4,096 tokens P50 | P99 |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for target in (int(t) for t in args.tokens.split(",")):
            system = words(rng, target // 2)
            payload = {"messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": words(rng, 20)},
            ]}  # fmt: skip
            ids = hf.ids(payload) or []
            while len(ids) < target:  # about `target` tokens of this tokenizer
                system += " " + words(rng, max(1, (target - len(ids)) // 2))
                payload["messages"][0]["content"] = system
                ids = hf.ids(payload) or []
            tok = timed(partial(hf.ids, payload), args.repeats)
            byt = timed(partial(BYTES.ids, payload), args.repeats)
            hashing = timed(partial(chain, ids[:4096], 16), args.repeats)
            cells = [
                f"{np.percentile(s, 50):.3f} | {np.percentile(s, 99):.3f}"
                for s in (tok, byt, hashing)
            ]
            print(f"| {len(ids)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

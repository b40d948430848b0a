"""The tiny-gpt training script: its corpus, its forward pass against the served one, its
determinism, and the weights committed beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import replica.models
from replica.config import TinyGptParams
from replica.models.tiny_gpt import Chunk, KVPool, TinyGPT, build_tiny_gpt
from replica.models.tokenizer import encode
from replica.models.train_tiny_gpt import build_corpus, causal_logits, main, parser, shape

TRAINED = Path(replica.models.__file__).parent / "trained" / "tiny-gpt.pt"


@pytest.fixture
def stdlib(tmp_path: Path) -> Path:
    """A small standard library: files written out of order, a test package, a broken file."""
    root = tmp_path / "lib"
    (root / "tests").mkdir(parents=True)
    (root / "site-packages").mkdir()
    (root / "zeta.py").write_text('"""Zeta module, the last one read."""\n')
    (root / "alpha.py").write_text(
        '"""Alpha module.\n\n    Indented lines are dedented."""\n\n'
        'class A:\n    """A class."""\n\n    def f(self):\n        """A method."""\n'
    )
    (root / "tests" / "test_alpha.py").write_text('"""Left out: a test."""\n')
    (root / "site-packages" / "extra.py").write_text('"""Left out: not the stdlib."""\n')
    (root / "broken.py").write_text('"""Left out: it does not parse."""\ndef (:\n')
    (root / "plain.py").write_text("x = 1\n")
    for n in reversed(range(30)):  # enough text for windows as long as the context
        (root / f"m{n:02}.py").write_text(f'"""Return item {n} of the thing, or None."""\n')
    return root


def test_the_corpus_is_every_docstring_in_file_order(stdlib: Path) -> None:
    corpus = build_corpus(stdlib)
    docs = corpus.text.decode().split("\n\n")
    assert docs[:5] == [
        "Alpha module.",
        "Indented lines are dedented.",  # one docstring over two paragraphs
        "A class.",
        "A method.",
        "Return item 0 of the thing, or None.",
    ]
    assert docs[-2:] == ["Zeta module, the last one read.", ""]
    assert "Left out" not in corpus.text.decode()
    assert corpus.starts[:2] == (0, len("Alpha module.\n\nIndented lines are dedented.\n\n"))
    assert all(corpus.text[start - 2 : start] == b"\n\n" for start in corpus.starts[1:])
    assert build_corpus(stdlib) == corpus


def test_the_training_forward_pass_is_the_served_one() -> None:
    model = TinyGPT(TinyGptParams(context_len=64)).eval()
    ids = encode("Return the first line of the docstring.")
    pool = KVPool(model, num_blocks=4, block_size=16)
    with torch.inference_mode():
        served = model.forward_chunks([Chunk(ids, 0, (0, 1, 2))], pool)[0]
        trained = causal_logits(model, torch.tensor([ids]))[0, -1]
    torch.testing.assert_close(trained, served, atol=1e-5, rtol=1e-5)


def test_steps_learn_short_then_spread_over_the_context_then_long() -> None:
    args = parser().parse_args(["--out", "w.pt", "--steps", "100", "--batch", "16"])
    assert [shape(step, args) for step in (0, 24, 25, 84, 85, 99)] == [
        (16, 128, 0), (16, 128, 0),  # the first 128 positions
        (16, 128, 384), (16, 128, 384),  # anywhere in the 512 of the context
        (4, 512, 0), (4, 512, 0),  # the whole context: as many bytes a step
    ]  # fmt: skip


def test_a_short_run_is_deterministic_and_writes_weights_the_replica_loads(
    stdlib: Path, tmp_path: Path
) -> None:
    threads = torch.get_num_threads()
    outs = [tmp_path / "a.pt", tmp_path / "b.pt"]
    try:
        for out in outs:
            args = ["--out", str(out), "--stdlib", str(stdlib), "--steps", "8", "--batch", "2"]
            assert main([*args, "--seq-len", "16", "--warmup", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    first, second = (torch.load(out, weights_only=True) for out in outs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    build_tiny_gpt(TinyGptParams(weights_path=outs[0]), torch.device("cpu"))


def test_the_committed_weights_are_small_and_load_into_the_default_shape() -> None:
    assert TRAINED.stat().st_size < 3_000_000
    model = build_tiny_gpt(TinyGptParams(weights_path=TRAINED), torch.device("cpu"))
    assert model.pos.num_embeddings == TinyGptParams().context_len

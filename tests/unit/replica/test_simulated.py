"""Simulated engine: profile timing, deterministic tokens, batch-invariant outputs."""

from __future__ import annotations

from array import array
from pathlib import Path

import pytest

from replica.engines.base import generate_batch
from replica.engines.calibrate import fit_line
from replica.engines.profile import load_profile
from replica.engines.simulated import SimulatedClassifierEngine, SimulatedGenerationEngine
from replica.generation import GenRequest
from replica.models.tokenizer import encode


def test_builtin_profile_loads() -> None:
    profile = load_profile()
    assert profile.generation.decode_base_s > 0
    assert profile.generation.max_num_seqs > 0
    assert profile.classifier.max_batch_size > 0


def test_step_time_is_prefill_per_token_plus_decode_base_and_per_sequence() -> None:
    slept: list[float] = []
    gen = load_profile().generation
    engine = SimulatedGenerationEngine(gen, sleep=slept.append)
    requests = [GenRequest(encode("abc"), 3, 64), GenRequest(encode("hello"), 3, 64)]
    generate_batch(engine, requests)
    prefill = gen.prefill_base_s + gen.prefill_s_per_token * 10
    decode = gen.decode_base_s + 2 * gen.decode_per_seq_s
    assert slept[0] == prefill
    assert slept[1] == decode


def test_a_step_with_decodes_and_a_prompt_chunk_is_one_pass_with_one_base() -> None:
    gen = load_profile().generation
    mixed = gen.step_s(prefill_tokens=40, prefill_seqs=1, decode_seqs=8)
    decode_only = gen.step_s(0, 0, 8)
    assert mixed == pytest.approx(decode_only + 40 * gen.prefill_s_per_token)
    assert mixed < decode_only + gen.step_s(40, 1, 0)  # not two passes


def test_simulated_tokens_do_not_depend_on_the_batch() -> None:
    engine = SimulatedGenerationEngine(load_profile().generation, sleep=lambda _s: None)
    alone = generate_batch(engine, [GenRequest(encode("x"), 8, 64)])[0].token_ids
    batch = generate_batch(engine, [GenRequest(encode("y"), 3, 64), GenRequest(encode("x"), 8, 64)])
    assert batch[1].token_ids == alone


def test_simulated_classifier_sums_strided_inputs() -> None:
    engine = SimulatedClassifierEngine(load_profile().classifier, 4, 2, sleep=lambda _s: None)
    out = engine.infer([array("f", [1, 2, 3, 4]), array("f", [0, 0, 0, 1] * 2)])
    assert list(out[0]) == [4.0, 6.0]
    assert list(out[1]) == [0.0, 1.0, 0.0, 1.0]


def test_fit_line_recovers_intercept_and_slope() -> None:
    base, slope = fit_line([1, 2, 4, 8], [0.012, 0.014, 0.018, 0.026])
    assert abs(base - 0.01) < 1e-9
    assert abs(slope - 0.002) < 1e-9


def test_calibrate_writes_a_profile_the_simulated_engine_loads(tmp_path: Path) -> None:
    from replica.cli import main

    config = tmp_path / "replica.yaml"
    config.write_text(
        "models:\n"
        "  - {kind: tiny-gpt, params: {layers: 1, width: 32, heads: 2, context_len: 64},"
        " batcher: {kind: continuous, max_num_seqs: 4}}\n"
        "  - {kind: classifier,"
        " params: {input_size: 8, hidden_sizes: [16], max_rows_per_request: 8}}\n"
    )
    out = tmp_path / "measured.yaml"
    assert main(["calibrate", "-c", str(config), "-o", str(out), "--device", "cpu"]) == 0
    profile = load_profile(out)
    assert profile.generation.max_num_seqs == 4
    assert profile.generation.kv_capacity_tokens == 4 * 64
    assert profile.classifier.max_batch_size == 8
    assert "cpu" in profile.source

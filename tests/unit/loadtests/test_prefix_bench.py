"""The prefix benchmark's workloads (seeded, shaped as documented, alike for every front end)
and its options."""

from __future__ import annotations

import math
import random

import pytest

from loadtests.prefix_bench import (
    Run,
    closed_users,
    command_of,
    conversation,
    conversations,
    kv_demand,
    levels,
    parser,
    replica_kv_tokens,
    sample_file,
    section_title,
    system_prompts,
)


def test_chat_conversations_share_eight_system_prompts_over_three_to_six_turns() -> None:
    convs = conversations("chat-prefix", 0, 6.0, 200.0, 2.0, replicas=5)
    assert convs == conversations("chat-prefix", 0, 6.0, 200.0, 2.0, replicas=5)
    assert convs != conversations("chat-prefix", 1, 6.0, 200.0, 2.0, replicas=5)
    systems = {c.system for c in convs}
    assert len(systems) == 8 and all(500 <= len(s) <= 2000 for s in systems)
    assert all(3 <= len(c.turns) <= 6 and c.turns[0].think_s == 0 for c in convs)
    requests = sum(len(c.turns) for c in convs)
    assert 0.85 * 6.0 * 200 < requests < 1.15 * 6.0 * 200  # ~rate requests/s offered
    arrivals = [c.arrival_s for c in convs]
    assert arrivals == sorted(arrivals) and arrivals[-1] < 200


def test_the_unique_control_shares_no_system_prompt() -> None:
    convs = conversations("unique", 0, 6.0, 100.0, 2.0, replicas=5)
    assert len({c.system for c in convs}) == len(convs)
    assert all(len(c.turns) == 1 for c in convs)
    assert 0.8 * 600 < len(convs) < 1.2 * 600


def test_the_command_spells_out_every_option_and_parses_back() -> None:
    args = parser().parse_args(["--seeds", "1", "--front-ends", "random,prefix_aware"])
    command = command_of(args)
    again = parser().parse_args(command.split()[3:])
    assert command_of(again) == command and "--loads closed,0.7" in command


def test_loads_are_the_closed_loop_or_shares_of_capacity() -> None:
    args = parser().parse_args(["--loads", "0.5,closed,1.2"])
    assert args.loads == ["0.5", "closed", "1.2"]
    for bad in ("0", "-1", "3", "fast", "0.5,open"):
        with pytest.raises(SystemExit):
            parser().parse_args(["--loads", bad])


def test_closed_loop_users_draw_their_own_seeded_conversations_over_the_same_prompts() -> None:
    systems = system_prompts("chat-prefix", 0, 5)
    assert systems == system_prompts("chat-prefix", 0, 3) != system_prompts("chat-prefix", 1, 5)
    first = [conversation("chat-prefix", random.Random(k), f"u{k}", 0.0, systems, 1.0)
             for k in range(20)]  # fmt: skip
    assert {c.system for c in first} <= set(systems)
    assert len({c.turns[0].question for c in first}) == 20
    assert closed_users(5) == 40  # two per sequence slot


def test_kv_pressure_prompts_fill_the_fleets_kv_with_several_tens_of_long_contexts() -> None:
    for replicas in (3, 5):
        systems = system_prompts("kv-pressure", 0, replicas)
        assert systems == system_prompts("kv-pressure", 0, replicas)
        assert all(1500 <= len(s) <= 3000 for s in systems) and len(set(systems)) == len(systems)
        fleet = replicas * replica_kv_tokens()
        assert fleet == replicas * 16_000  # the simulated 7B/A10G profile's KV
        assert 1.0 <= kv_demand(systems, replicas) < 1.0 + 3000 / fleet
        assert len(systems) >= 20
    convs = conversations("kv-pressure", 0, 6.0, 200.0, 2.0, replicas=5)
    assert {c.system for c in convs} <= set(system_prompts("kv-pressure", 0, 5))
    assert all(3 <= len(c.turns) <= 6 for c in convs)


def test_new_options_are_spelled_out_only_away_from_their_defaults() -> None:
    plain = command_of(parser().parse_args([]))
    assert "--instances" not in plain and "--hashes" not in plain  # older commands read alike
    args = parser().parse_args(["--instances", "1,3", "--hashes", "vllm"])
    command = command_of(args)
    assert "--instances 1,3 --hashes vllm --out" in command
    again = parser().parse_args(command.split()[3:])
    assert (again.instances, again.hashes, command_of(again)) == ([1, 3], "vllm", command)
    for bad in ("0", "1,x", "", "17"):
        with pytest.raises(SystemExit):
            parser().parse_args(["--instances", bad])


def test_each_instance_count_has_its_own_sections_and_sample_files() -> None:
    args = parser().parse_args(["--instances", "1,3", "--replicas", "4"])
    assert levels(args)[:2] == [("chat-prefix", "closed", 1), ("chat-prefix", "closed", 3)]
    assert section_title("kv-pressure", "closed", 1, args) == "kv-pressure, closed loop (32 users)"
    assert section_title("kv-pressure", "0.7", 3, args) == (
        "kv-pressure, open loop at 70% of capacity, 3 front-end instances"
    )
    one = Run("kv-pressure", "closed", "precise_prefix:events", 0, math.nan)
    three = Run("kv-pressure", "closed", "precise_prefix:events", 0, math.nan, instances=3)
    assert sample_file(one) == "kv-pressure-closed-precise_prefix_events-seed0.csv.gz"
    assert sample_file(three) == "kv-pressure-closed-precise_prefix_events-x3-seed0.csv.gz"
    assert (one.label, three.label) == ("precise_prefix:events", "precise_prefix:events x3")

"""The prefix benchmark's workload: seeded, shaped as documented, alike for every front end."""

from __future__ import annotations

import random

import pytest

from loadtests.prefix_bench import (
    closed_users,
    command_of,
    conversation,
    conversations,
    parser,
    system_prompts,
)


def test_chat_conversations_share_eight_system_prompts_over_three_to_six_turns() -> None:
    convs = conversations("chat-prefix", seed=0, rate=6.0, seconds=200.0, think_s=2.0)
    assert convs == conversations("chat-prefix", seed=0, rate=6.0, seconds=200.0, think_s=2.0)
    assert convs != conversations("chat-prefix", seed=1, rate=6.0, seconds=200.0, think_s=2.0)
    systems = {c.system for c in convs}
    assert len(systems) == 8 and all(500 <= len(s) <= 2000 for s in systems)
    assert all(3 <= len(c.turns) <= 6 and c.turns[0].think_s == 0 for c in convs)
    requests = sum(len(c.turns) for c in convs)
    assert 0.85 * 6.0 * 200 < requests < 1.15 * 6.0 * 200  # ~rate requests/s offered
    arrivals = [c.arrival_s for c in convs]
    assert arrivals == sorted(arrivals) and arrivals[-1] < 200


def test_the_unique_control_shares_no_system_prompt() -> None:
    convs = conversations("unique", seed=0, rate=6.0, seconds=100.0, think_s=2.0)
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
    systems = system_prompts("chat-prefix", 0)
    assert systems == system_prompts("chat-prefix", 0) != system_prompts("chat-prefix", 1)
    first = [conversation("chat-prefix", random.Random(k), f"u{k}", 0.0, systems, 1.0)
             for k in range(20)]  # fmt: skip
    assert {c.system for c in first} <= set(systems)
    assert len({c.turns[0].question for c in first}) == 20
    assert closed_users(5) == 40  # two per sequence slot

"""Where the gateway subscribes for a replica's KV cache events: the fleet's port on the
replica URL's host (IPv6 in brackets), data-parallel ranks on the ports after it as the engines
offset them, or the replica's own endpoints."""

from __future__ import annotations

from gateway.config.schema import ReplicaEvents
from gateway.control.kv_events import Target, offset, seed_of, targets
from gateway.routing.options import KvEventsOptions


def test_each_rank_of_each_replica_on_the_fleets_ports() -> None:
    options = KvEventsOptions(port=5557, replay_port=5600, data_parallel_size=2)
    found = targets(["http://10.0.0.7:8000", "http://[fd00::1]:8000"], options, {})
    assert found == {
        ("http://10.0.0.7:8000", 0): Target(
            "http://10.0.0.7:8000", 0, "tcp://10.0.0.7:5557", "tcp://10.0.0.7:5600"
        ),
        ("http://10.0.0.7:8000", 1): Target(
            "http://10.0.0.7:8000", 1, "tcp://10.0.0.7:5558", "tcp://10.0.0.7:5601"
        ),
        ("http://[fd00::1]:8000", 0): Target(
            "http://[fd00::1]:8000", 0, "tcp://[fd00::1]:5557", "tcp://[fd00::1]:5600"
        ),
        ("http://[fd00::1]:8000", 1): Target(
            "http://[fd00::1]:8000", 1, "tcp://[fd00::1]:5558", "tcp://[fd00::1]:5601"
        ),
    }


def test_a_replicas_own_endpoints_win_and_no_replay_port_means_none() -> None:
    own = {"http://a:1": ReplicaEvents(endpoint="ipc:///run/kv", replay_endpoint=None)}
    found = targets(["http://a:1", "http://b:1"], KvEventsOptions(data_parallel_size=2), own)
    assert [t.endpoint for t in found.values()] == [
        "ipc:///run/kv",
        "ipc:///run/kv_dp1",
        "tcp://b:5557",
        "tcp://b:5558",
    ]
    assert {t.replay for t in found.values()} == {None}


def test_rank_zero_keeps_the_endpoint() -> None:
    assert offset("tcp://h:7000", 0) == "tcp://h:7000"
    assert offset("tcp://h:7000", 3) == "tcp://h:7003"


def test_a_lora_adapter_chains_from_its_own_seed() -> None:
    assert seed_of(None) == seed_of("") == 0
    assert seed_of("sql-adapter") not in (0, seed_of("chat-adapter"))

"""`infergate up`'s cluster file: replica groups serving different models, one port each."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from gateway.cluster import ClusterConfig, gateway_yaml, load_cluster, replica_urls
from gateway.config import parse_config
from gateway.errors import ConfigError


def args(**given: object) -> argparse.Namespace:
    values: dict[str, object] = {"replicas": None, "engine": None, "model": None}
    values.update(given)
    return argparse.Namespace(**values)


def test_groups_give_each_replica_its_models_and_the_next_port(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "engine": "simulated",
                "groups": [
                    {"replicas": 2, "models": ["tiny-gpt"]},
                    {"replicas": 1, "models": ["classifier"]},
                ],
            }
        )
    )
    cluster = load_cluster(path, args())
    assert cluster.size == 3 and [g.models for g in cluster.members] == [
        ("tiny-gpt",), ("tiny-gpt",), ("classifier",),
    ]  # fmt: skip
    assert replica_urls(cluster)[-1] == "http://127.0.0.1:9003"
    config = gateway_yaml(cluster, argparse.Namespace(strategy=None, port=None))
    assert [r["url"] for r in config["replicas"]] == replica_urls(cluster)
    # Each replica's KV cache events, two ports apiece, for precise_prefix to follow.
    assert config["replicas"][2]["kv_events"] == {
        "endpoint": "tcp://127.0.0.1:5561", "replay_endpoint": "tcp://127.0.0.1:5562",
    }  # fmt: skip
    assert parse_config(config).routing.prefix.events is not None
    with pytest.raises(ConfigError, match="the cluster file has groups"):
        load_cluster(path, args(replicas=4))


def test_model_flag_makes_one_group_of_every_replica() -> None:
    cluster = load_cluster(None, args(replicas=3, model=["tiny-gpt"]))
    assert cluster.size == 3 and {g.models for g in cluster.members} == {("tiny-gpt",)}
    assert ClusterConfig().size == 2 and ClusterConfig().members[0].models == ()

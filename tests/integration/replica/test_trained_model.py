"""The trained tiny-gpt weights as `infergate up` serves them: a real replica process, started by
the launcher (gateway/cluster.py) from a cluster file, answers a greedy completion with text
where random weights answer with noise."""

from __future__ import annotations

import argparse
import string
from pathlib import Path

import aiohttp
import yaml

from gateway.cluster import (
    ClusterConfig,
    default_replica_yaml,
    load_cluster,
    replica_urls,
    replicas_running,
    wait_ready,
)
from tests.support.processes import free_port

PROMPTS = ("The ", "Return the ", "def ")
TEXT = frozenset(string.ascii_letters + " ")


def text_share(text: str) -> float:
    return sum(c in TEXT for c in text) / max(1, len(text))


async def complete(session: aiohttp.ClientSession, url: str, prompt: str) -> str:
    body = {"model": "tiny-gpt", "prompt": prompt, "max_tokens": 64, "temperature": 0}
    async with session.post(f"{url}/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
    assert answer["usage"]["completion_tokens"] == 64
    text: str = answer["choices"][0]["text"]
    return text


def up_cluster(tmp_path: Path) -> ClusterConfig:
    """A cluster file as `infergate up --model tiny-gpt` reads it: one replica, no KV events."""
    path = tmp_path / "cluster.yaml"
    cluster = {"replicas": 1, "first_replica_port": free_port(), "kv_events_port": None}
    path.write_text(yaml.safe_dump(cluster))
    return load_cluster(path, argparse.Namespace(replicas=None, engine=None, model=["tiny-gpt"]))


async def test_infergate_up_serves_trained_weights_that_answer_with_text(tmp_path: Path) -> None:
    cluster = up_cluster(tmp_path)
    assert cluster.tiny_gpt_weights == "trained" and default_replica_yaml(cluster) is not None
    urls = replica_urls(cluster)
    log = tmp_path / "replica.log"
    with log.open("wb") as output, replicas_running(cluster, output) as procs:
        await wait_ready(urls, procs)
        async with aiohttp.ClientSession() as session:
            answers = {prompt: await complete(session, urls[0], prompt) for prompt in PROMPTS}
    assert [proc.returncode for proc in procs] == [0], log.read_text(errors="replace")
    for prompt, text in answers.items():
        assert text_share(text) >= 0.9, (prompt, text)


def test_a_cluster_built_in_code_keeps_random_weights() -> None:
    assert ClusterConfig().tiny_gpt_weights == "random"
    assert default_replica_yaml(ClusterConfig()) is None
    trained = ClusterConfig(tiny_gpt_weights="trained", engine="simulated")
    assert default_replica_yaml(trained) is None  # the simulated engine has no weights


def test_random_bytes_are_not_text() -> None:
    """The bar the trained model clears, and noise (the printable bytes a random-weight model
    emits, evenly) does not."""
    assert text_share("".join(map(chr, range(32, 127)))) < 0.6
    assert text_share("Return the name of the file object") == 1.0

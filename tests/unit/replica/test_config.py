"""Config loading: defaults, errors naming key paths, command-line overrides."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from replica.cli import apply_overrides, serve_parser
from replica.config import ConfigError, load_config, parse_config
from replica.engines.profile import load_profile


def test_empty_config_serves_tiny_gpt_continuous_and_classifier_dynamic() -> None:
    config = parse_config({})
    assert config.server.host == "127.0.0.1"
    assert config.engine.kind == "torch"
    assert config.engine.device == "auto"
    assert [(m.name, m.batcher.kind) for m in config.models] == [
        ("tiny-gpt", "continuous"),
        ("classifier", "dynamic"),
    ]


def test_error_names_the_key_path() -> None:
    raw = {
        "models": [
            {"kind": "tiny-gpt"},
            {"kind": "classifier", "batcher": {"kind": "dynamic", "max_wait_ms": "soon"}},
        ]
    }
    with pytest.raises(ConfigError, match=r"models\[1\]\.batcher\.max_wait_ms: "):
        parse_config(raw)


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"server\.prot: Extra inputs"):
        parse_config({"server": {"prot": 1}})


def test_continuous_batcher_is_for_generation_only() -> None:
    with pytest.raises(ConfigError, match="continuous"):
        parse_config({"models": [{"kind": "classifier", "batcher": {"kind": "continuous"}}]})


def test_model_names_are_unique() -> None:
    with pytest.raises(ConfigError, match="used twice"):
        parse_config({"models": [{"kind": "classifier"}, {"kind": "classifier"}]})


def test_heads_must_divide_width() -> None:
    with pytest.raises(ConfigError, match=r"models\[0\]\.params"):
        parse_config({"models": [{"kind": "tiny-gpt", "params": {"width": 100, "heads": 3}}]})


def test_load_config_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "replica.yaml"
    path.write_text(
        "server:\n  port: 9001\n"
        "models:\n  - kind: tiny-gpt\n    batcher: {kind: static, batch_size: 4}\n"
    )
    config = load_config(path)
    assert config.server.port == 9001
    assert config.models[0].batcher.kind == "static"


def test_load_config_reports_bad_yaml_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("server: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_flags_override_config_keys() -> None:
    args = serve_parser().parse_args(
        ["--port", "9002", "--engine", "simulated", "--model", "tiny-gpt", "--batcher", "dynamic"]
    )
    config = parse_config(apply_overrides({}, args))
    assert config.server.port == 9002
    assert config.engine.kind == "simulated"
    assert [(m.name, m.batcher.kind) for m in config.models] == [("tiny-gpt", "dynamic")]


def test_batcher_flag_can_target_one_model() -> None:
    args = serve_parser().parse_args(["--batcher", "classifier=none"])
    config = parse_config(apply_overrides({}, args))
    assert [m.batcher.kind for m in config.models] == ["continuous", "none"]


def test_unknown_model_flag_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--model: 'gpt-5'"):
        apply_overrides({}, serve_parser().parse_args(["--model", "gpt-5"]))


def _alias_bomb(last: str) -> str:
    """Nine lists of nine aliases, nested eight deep: 358 bytes, 43 million values."""
    lines = ["a: &a [" + ", ".join(["lol"] * 9) + "]"]
    for above, name in itertools.pairwise("abcdefgh"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{above}"] * 9) + "]")
    return "\n".join(lines) + f"\n{last}: *h\n"


@pytest.mark.parametrize(
    ("load", "last"),
    [(load_config, "models"), (load_config, "server"), (load_profile, "generation")],
)
def test_an_alias_bomb_is_refused_at_once(load: object, last: str, tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(last))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"invalid YAML: \(yaml\) line \d+, column \d+: aliases"):
        load(path)  # type: ignore[operator]
    assert time.perf_counter() - started < 1.0


def test_yaml_nested_deeper_than_any_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("models: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested deeper than 64"):
        load_config(path)
    with pytest.raises(ConfigError, match="nested deeper than 64"):
        load_profile(path)

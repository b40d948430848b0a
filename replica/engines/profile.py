"""Timing profiles for the simulated engine: schema, the built-in 7B/A10G profile, load/save."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from replica.config import ConfigError, read_raw
from replica.errors import format_validation_error

BUILTIN_PROFILE = Path(__file__).parent / "profiles" / "a10g-7b.yaml"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GenerationProfile(_Frozen):
    prefill_base_s: float = Field(ge=0)
    prefill_s_per_token: float = Field(ge=0)
    decode_base_s: float = Field(ge=0)
    decode_per_seq_s: float = Field(ge=0)
    max_num_seqs: int = Field(gt=0)
    kv_capacity_tokens: int = Field(gt=0)
    block_size: int = Field(default=16, gt=0)  # KV block (page) size, tokens

    def step_s(self, prefill_tokens: int, prefill_seqs: int, decode_seqs: int) -> float:
        """One forward pass, as the torch engine (and vLLM) runs a step: decodes and prompt
        chunks together, so a step pays one base (the larger, when it has both), then per
        prompt token and per decoding sequence."""
        prefill_base = self.prefill_base_s if prefill_seqs else 0.0
        base = max(prefill_base, self.decode_base_s if decode_seqs else 0.0)
        per_token = self.prefill_s_per_token * prefill_tokens
        return base + per_token + self.decode_per_seq_s * decode_seqs


class ClassifierProfile(_Frozen):
    base_s: float = Field(ge=0)
    per_row_s: float = Field(ge=0)
    max_batch_size: int = Field(gt=0)

    def forward_s(self, rows: int) -> float:
        return self.base_s + self.per_row_s * rows


class TimingProfile(_Frozen):
    name: str
    source: str
    generation: GenerationProfile
    classifier: ClassifierProfile


def load_profile(path: Path | None = None) -> TimingProfile:
    path = path or BUILTIN_PROFILE
    raw = read_raw(path, "engine.profile_path: ")
    try:
        return TimingProfile.model_validate(raw)
    except ValidationError as error:
        reason = format_validation_error(error, raw)
        raise ConfigError(f"engine.profile_path ({path}): {reason}") from None


def dump_profile(profile: TimingProfile, path: Path, header: str) -> None:
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    body = yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False)
    path.write_text(comment + body, encoding="utf-8")

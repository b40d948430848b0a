"""Each API key's share of the job store: how many lines and bytes its jobs may keep there.

Without it one key could fill the disk (four large batches wrote 452 MB in 10 s). A key's
usage is what its stored jobs hold: lines are its jobs not cancelled, bytes their request
bodies plus the answers recorded so far. Both stores check a submit against the quota in the
transaction that inserts it (PostgreSQL under the key's advisory lock, so gateways sharing the
store cannot pass it together) and refuse it whole with a 429 saying what is left. An answer
counts once recorded, so a key may end over its quota; its next submit is then refused until
finished jobs expire (`jobs.result_retention_s`). A cancel deletes the inputs it stops at
once, and gives their share back.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import GatewayError

# The defaults of jobs.max_bytes_per_key and jobs.max_lines_per_key (gateway/config/schema.py).
DEFAULT_MAX_STORED_BYTES = 256 * 1024 * 1024  # 4 batches at the largest jobs.max_batch_bytes
DEFAULT_MAX_STORED_LINES = 200_000  # 4 batches at the largest jobs.max_batch_lines


@dataclass(frozen=True)
class Usage:
    lines: int
    bytes: int


@dataclass(frozen=True)
class Quota:
    """What one key may keep in the store; None: no limit."""

    max_bytes: int | None = DEFAULT_MAX_STORED_BYTES
    max_lines: int | None = DEFAULT_MAX_STORED_LINES

    @property
    def unlimited(self) -> bool:
        return self.max_bytes is None and self.max_lines is None

    def admit(self, used: Usage, lines: int, size: int) -> None:
        """Raise QuotaExceeded unless `lines` more lines of `size` bytes fit beside `used`."""
        bytes_fit = self.max_bytes is None or used.bytes + size <= self.max_bytes
        lines_fit = self.max_lines is None or used.lines + lines <= self.max_lines
        if bytes_fit and lines_fit:
            return
        raise QuotaExceeded(
            f"over this key's job storage quota: this submit holds {size} bytes in {lines} "
            f"lines, and {_of(used.bytes, self.max_bytes, 'bytes')} and "
            f"{_of(used.lines, self.max_lines, 'lines')} are in use, "
            f"{_left(used.bytes, self.max_bytes, 'bytes')} and "
            f"{_left(used.lines, self.max_lines, 'lines')} left. Finished jobs give their share "
            "back when they expire (jobs.result_retention_s), cancelled ones at once"
        )


def _of(used: int, limit: int | None, unit: str) -> str:
    return f"{used} {unit}" if limit is None else f"{used} of {limit} {unit}"


def _left(used: int, limit: int | None, unit: str) -> str:
    return f"no limit on {unit}" if limit is None else f"{max(limit - used, 0)} {unit}"


class QuotaExceeded(GatewayError):
    status = 429
    error_type = "quota_exceeded"


UNLIMITED = Quota(max_bytes=None, max_lines=None)


def stored_bytes(text: str | None) -> int:
    """What a body or an answer counts against the quota: its UTF-8 bytes."""
    return 0 if text is None else len(text.encode("utf-8", "surrogatepass"))

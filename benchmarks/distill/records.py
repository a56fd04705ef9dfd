"""The record store: one JSON file per finished point, under ``OUT/records/<key>.json``.

A key hashes the experiment, the teacher checkpoint and the point's settings, so a grid that
is run again (after an interruption, or with more seeds) finds its finished points and
computes only the others. A record is written atomically and marked ``complete``; a missing
or half-written one is computed again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from benchmarks.common import write_json

VERSION = 1
#: Settings added after records existed, with the value those records had: at that value a
#: setting is left out of the key, so the older records keep their keys.
KEY_DEFAULTS: dict[str, Any] = {"objective": "activations"}


def record_key(experiment: str, teacher_sha: str, settings: dict[str, Any]) -> str:
    """The 20-hex-digit key of one point."""
    kept = {k: v for k, v in settings.items() if k not in KEY_DEFAULTS or v != KEY_DEFAULTS[k]}
    text = json.dumps({"v": VERSION, "e": experiment, "t": teacher_sha, **kept}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class RecordStore:
    """The finished points of one output directory."""

    def __init__(self, out_dir: Path) -> None:
        self.folder = Path(out_dir) / "records"

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The complete record of ``key``, or ``None`` (missing or half-written)."""
        try:
            record = json.loads(self.path(key).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return record if isinstance(record, dict) and record.get("complete") else None

    def put(self, key: str, record: dict[str, Any]) -> dict[str, Any]:
        """Write ``record`` (marked complete) under ``key``; returns it."""
        record = {**record, "key": key, "version": VERSION, "complete": True}
        write_json(self.path(key), record)
        return record

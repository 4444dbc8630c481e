"""Atomic file writes: a reader never sees a half-written results, config or report file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 1, **kwargs: Any) -> Path:
    """Write `data` as JSON (UTF-8, trailing newline) atomically; extra arguments go to `json.dumps`."""
    return write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False, **kwargs) + "\n")

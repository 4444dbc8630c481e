"""Atomic file writes: a reader never sees a half-written results, config or report file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix) for any writer; renamed onto `path` when the block
    ends without an error, removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `path` for a writer of several files (e.g. ``save_pretrained``); it takes the place
    of `path` (and of whatever was there) when the block ends without an error, and is removed when it raises, so a
    crash never leaves a folder that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_stem(path: str | os.PathLike) -> Path:
    """`path` without a ``.safetensors`` or ``.json`` suffix: the stem of a weights + sidecar pair."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 1, **kwargs: Any) -> Path:
    """Write `data` as JSON (UTF-8, trailing newline) atomically; extra arguments go to `json.dumps`."""
    return write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False, **kwargs) + "\n")


def read_json(path: str | os.PathLike, kind: type = dict) -> Any:
    """Read a JSON file that must hold a `kind` (``dict``: an object, ``list``: an array); a file that is not
    valid JSON (e.g. cut short) or holds something else raises a ValueError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or delete it") from err
    if not isinstance(data, kind):
        raise ValueError(f"{path} must hold a JSON {'object' if kind is dict else 'array'}, got {type(data).__name__}")
    return data


def files_sha256(paths: Sequence[str | os.PathLike]) -> str:
    """The sha256 (hex) of the files' contents, in order (to tell whether an input changed; of one file other than
    safetensors, what ``sha256sum`` prints); a safetensors file counts by its tensors and metadata, not by the order
    its header happens to list them in."""
    digest = hashlib.sha256()
    for path in paths:
        canonical = Path(path).suffix == ".safetensors"
        digest.update(_canonical_safetensors(path) if canonical else Path(path).read_bytes())
    return digest.hexdigest()


def files_fingerprint(paths: Sequence[str | os.PathLike]) -> str:
    """The first 16 hex digits of `files_sha256`: a short hash of the files' contents."""
    return files_sha256(paths)[:16]


def _canonical_safetensors(path: str | os.PathLike) -> bytes:
    """A safetensors file's bytes with its JSON header's keys sorted: safetensors writes the metadata in a
    different order each time, so saving the same tensors twice gives different bytes."""
    data = Path(path).read_bytes()
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({err})") from err
    return json.dumps(header, sort_keys=True).encode() + data[8 + size:]

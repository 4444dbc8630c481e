"""Resumable work: a step that leaves work in a folder (or a file) resumes it only with the settings it was made with.

The rule every resumable step follows: the work records its settings; run again with the same settings, it is
resumed; with other settings it is **refused** (`OtherSettingsError`, naming each differing setting and its two
values), unless the work is a pure cache that the step can compute again from its inputs (``recompute=True``): then
it is **discarded** and computed afresh. Records are written atomically (`files.write_json_atomic`), so a crash never
leaves a half-written one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from .files import read_json, write_json_atomic

#: what a refusal advises unless the step says otherwise
DEFAULT_ADVICE = "use another output folder or delete it"


class OtherSettingsError(ValueError):
    """Work recorded with other settings than the ones given; the message names each differing setting."""


def setting_differences(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Each setting of `now` whose value `recorded` does not have (a setting `recorded` lacks counts as None), with
    its two values: ``{name: (recorded, now)}``. Settings only `recorded` has are no longer used and do not count."""
    return {k: (recorded.get(k), v) for k, v in now.items() if recorded.get(k) != v}


def check_settings(recorded: Mapping[str, Any], now: Mapping[str, Any], *, where: str | os.PathLike, what: str,
                   advice: str = DEFAULT_ADVICE) -> None:
    """Refuse to resume `what` (e.g. ``"runs"``) recorded in `where` with other settings than `now`: raise an
    `OtherSettingsError` naming each difference (``"train_size: 16 there, 12 now"``) and what to do (`advice`)."""
    differ = setting_differences(recorded, now)
    if differ:
        changes = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differ.items())
        raise OtherSettingsError(f"{where} holds {what} made with other settings ({changes}); {advice}")


def resume_folder(folder: str | os.PathLike, settings: Mapping[str, Any], *, record: str, what: str,
                  recompute: bool = False, advice: str = DEFAULT_ADVICE) -> dict[str, Any] | None:
    """Make `folder` ready for work with `settings`, by the module's rule, and return its record (the JSON object in
    ``folder/record``, which may hold more than the settings, e.g. progress), or None where the work starts afresh.

    A record of other settings is refused (`check_settings`), or with `recompute` (a pure cache) the folder is
    deleted; so is, with `recompute`, a folder without a record (its work is not known to be of `settings`). A new
    start writes `settings` as the record; the step may later rewrite it with its progress, settings kept."""
    folder = Path(folder)
    path = folder / record
    if path.is_file():
        recorded = read_json(path)
        if not (recompute and setting_differences(recorded, settings)):
            check_settings(recorded, settings, where=folder, what=what, advice=advice)
            return recorded
        shutil.rmtree(folder)
    elif recompute and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, dict(settings), indent=2)
    return None

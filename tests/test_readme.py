"""The README's Python examples run as printed, offline, on the embedded Gemma 3 270M; an example marked Hub-only
(its first line a ``# Hub-only: <reason>`` comment, shown in the README) is skipped with that reason. The README
stays a short user's page, and the links of the user-facing pages resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HUB_ONLY = "# Hub-only:"
MAX_README_LINES = 200
PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
DIARY = re.compile(r"\bsessions?\b|stretch of work|next steps\b|re-measured in", re.IGNORECASE)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """Every ```python block of a markdown text: (line number of its first code line, code)."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```python[^\n]*\n(.*?)^```[ \t]*$", text, re.MULTILINE | re.DOTALL)]


def hub_only_reason(code: str) -> str | None:
    """The reason a block gives for needing the Hub (its first line ``# Hub-only: <reason>``), else None."""
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    return first[len(HUB_ONLY):].strip() if first.startswith(HUB_ONLY) else None


BLOCKS = python_blocks(README.read_text())
OFFLINE = [(line, code) for line, code in BLOCKS if hub_only_reason(code) is None]
HUB = [(line, code) for line, code in BLOCKS if hub_only_reason(code) is not None]


def test_the_readme_is_a_short_page_whose_examples_compile():
    assert len(README.read_text().splitlines()) <= MAX_README_LINES
    assert len(OFFLINE) >= 4 and HUB
    for line, code in BLOCKS:
        compile(code, f"README.md:{line}", "exec")
    for line, code in HUB:
        assert hub_only_reason(code), f"README.md:{line}: a Hub-only block must say why"


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a markdown page's headings (lower case, punctuation dropped, spaces as hyphens)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_every_local_link_of_the_user_pages_resolves():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
            if anchor and path.suffix == ".md":
                assert anchor in anchors(path), f"{page.relative_to(ROOT)} links to {target}: no such heading"


def test_the_user_pages_hold_no_work_diary():
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            assert not DIARY.search(line), f"{page.relative_to(ROOT)}:{number}: {line}"


@pytest.mark.integration
def test_the_offline_examples_run_as_printed_in_order(tmp_path, monkeypatch, capsys):
    """The blocks form one walk-through (later ones use the model the first loads), run in one namespace in a
    scratch folder, with the Hub switched off."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    namespace: dict = {"__name__": "readme"}
    for line, code in OFFLINE:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own examples
    printed = capsys.readouterr().out
    assert "[1.0, 1.0, 0.5, 0.0]" in printed  # the schedule the annealing example prints
    assert (tmp_path / "my-adapter" / "concept_ablation_config.json").is_file()
    assert {"adapter_config.json", "concept_ablation_config.json"} <= {p.name for p in (tmp_path / "my-run").iterdir()}
    assert namespace["ablation"].config.mode == "leace"


@pytest.mark.parametrize("line, code", HUB, ids=[f"README.md:{line}" for line, _ in HUB])
def test_hub_only_examples_are_skipped_with_the_readmes_reason(line, code):
    pytest.skip(f"README.md:{line}: {hub_only_reason(code)}")

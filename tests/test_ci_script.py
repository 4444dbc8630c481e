"""The CI script parses and runs the README's test command (a syntax error there fails CI before any test)."""

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CI_SCRIPT = ROOT / ".ci" / "run"


def test_ci_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(CI_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(CI_SCRIPT, os.X_OK), f"{CI_SCRIPT} is not executable"


def test_ci_script_runs_the_readme_test_command_with_browser_tests_required() -> None:
    readme = (ROOT / "README.md").read_text()
    test_command = re.search(r"^(make \w+)\s+# the test suite", readme, re.MULTILINE)
    assert test_command, "README names no test command"
    commands = [line.strip() for line in CI_SCRIPT.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == test_command.group(1)
    assert "export HF_CONCEPT_ABLATION_BROWSER_TESTS=required" in " ".join(commands)

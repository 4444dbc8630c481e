"""The CI scripts parse, check the installed wheel and run the README's test command (a syntax error there fails CI
before any test)."""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CI_SCRIPT = ROOT / ".ci" / "run"
WHEEL_CHECK = ROOT / ".ci" / "check_wheel"


@pytest.mark.parametrize("script", [CI_SCRIPT, WHEEL_CHECK], ids=["run", "check_wheel"])
def test_ci_scripts_are_valid_bash(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_ci_checks_the_installed_wheel_before_the_tests() -> None:
    commands = [line.strip() for line in CI_SCRIPT.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert commands.index(".ci/check_wheel") < commands.index("make test")
    check = WHEEL_CHECK.read_text()
    assert "install --quiet torch==2.13.0" in check and "train gender_bias --help" in check


def test_ci_script_runs_the_readme_test_command_with_browser_tests_required() -> None:
    readme = (ROOT / "README.md").read_text()
    test_command = re.search(r"^(make \w+)\s+# the test suite", readme, re.MULTILINE)
    assert test_command, "README names no test command"
    commands = [line.strip() for line in CI_SCRIPT.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == test_command.group(1)
    assert "export HF_CONCEPT_ABLATION_BROWSER_TESTS=required" in " ".join(commands)

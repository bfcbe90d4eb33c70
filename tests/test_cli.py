"""The `mtmm` command: subcommands parse and run."""

from __future__ import annotations

import json
import subprocess
import sys

from scheduler import cli


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpp_core"]["usable"] is True
    assert info["torch"]
    assert "usable" in info["triton_kernels"]


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "info"], capture_output=True, text=True, check=True
    ).stdout
    assert "cpp_core: yes" in out

"""The original system's config file gets one message mapping each of its keys to AIOS, and exit status 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aios import original_config
from aios.config import load_settings
from aios.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]

#: The original's file as its users wrote it: INI (the addresses are not valid TOML).
ORIGINAL_INI = """\
[primary_server]
host = 192.168.1.10
port = 8000

[secondary_server]
host = 192.168.1.11
port = 8000

[orchestrator]
sync_interval = 30
task_timeout = 600
max_agents = 10
"""

#: The same keys in a file that happens to be valid TOML, with the loose keys at the top level.
ORIGINAL_TOML = """\
sync_interval = 30
task_timeout = 600
max_agents = 10

[primary_server]
host = "192.168.1.10"
port = 8000

[secondary_server]
host = "192.168.1.11"
port = 8000
"""


def run_cli(tmp_path: Path, config: Path) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("AIOS_")}
    return subprocess.run(
        [sys.executable, "-m", "aios.cli", "config"],
        env={**clean, "AIOS_CONFIG": str(config), "PYTHONPATH": str(REPO_ROOT)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("text", [ORIGINAL_INI, ORIGINAL_TOML], ids=["ini", "toml"])
def test_the_originals_config_file_is_answered_with_the_mapping_and_exit_status_2(tmp_path, text):
    # Given a config file in the original's shape
    config = tmp_path / "config.ini"
    config.write_text(text)
    # When any aios command starts with it
    done = run_cli(tmp_path, config)
    # Then it stops with status 2 and one message mapping every key, never pydantic's bare refusal
    assert done.returncode == 2, done.stderr
    assert "Extra inputs are not permitted" not in done.stderr
    for original, setting in [
        ("[primary_server]", "database.url"),
        ("[secondary_server]", "broker.sentinel_master"),
        ("sync_interval", "orchestrator.sync_interval_s"),
        ("task_timeout", "orchestrator.task_timeout_s"),
        ("max_agents", "orchestrator.max_agents"),
        ("host / port", "api.host, api.port"),
    ]:
        assert f"{original}" in done.stderr and setting in done.stderr, (original, done.stderr)
    # And it shows the TOML to write instead, with the file's own values
    assert "[orchestrator]\n  sync_interval_s = 30\n  task_timeout_s = 600\n  max_agents = 10" in done.stderr
    assert "docs/ha.md" in done.stderr


def test_an_aios_file_with_the_same_words_in_their_aios_places_is_not_flagged(tmp_path):
    # Given an AIOS file whose [orchestrator] max_agents is a real AIOS key
    config = tmp_path / "aios.toml"
    config.write_text("[orchestrator]\nmax_agents = 5\nsync_interval_s = 30\n")
    # When it is loaded / Then it loads
    settings = load_settings(environ={"AIOS_CONFIG": str(config)})
    assert settings.orchestrator.max_agents == 5


def test_a_file_that_is_neither_toml_nor_the_originals_gets_the_toml_error(tmp_path):
    config = tmp_path / "broken.toml"
    config.write_text("[api\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(environ={"AIOS_CONFIG": str(config)})


def test_every_original_key_is_in_the_table_of_docs_ha():
    # docs/ha.md has the same table as the message (one row per key of the original)
    text = (REPO_ROOT / "docs" / "ha.md").read_text()
    section = text.split("## Coming from the original's config file", 1)[1]
    for mapping in original_config.MAPPINGS:
        assert f"`{mapping.original}`" in section, mapping.original
        for setting in re.split(r", | \+ ", mapping.setting):
            assert f"`{setting}`" in section, (mapping.original, setting)

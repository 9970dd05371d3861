"""The configuration loader: defaults, then the TOML file, then the environment; bad input stops the process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aios.config import Settings, load_settings
from aios.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
REPO_CONFIG = REPO_ROOT / "config" / "aios.toml"


@pytest.fixture()
def empty_toml(tmp_path: Path) -> Path:
    path = tmp_path / "empty.toml"
    path.write_text("")
    return path


@pytest.fixture()
def toml_file(tmp_path: Path) -> Path:
    path = tmp_path / "aios.toml"
    path.write_text(
        '[api]\nport = 9001\nhost = "0.0.0.0"\n\n'
        "[orchestrator]\ndefault_priority = 7\nmax_retries = 1\n\n"
        '[agents]\ncommand_allowlist = ["ls"]\n'
    )
    return path


def test_defaults_are_the_documented_values(empty_toml):
    # Given no settings at all (an empty config file and no environment)
    settings = load_settings(environ={"AIOS_CONFIG": str(empty_toml)})
    # Then the documented defaults apply
    assert settings.orchestrator.task_timeout_s == 3600
    assert settings.orchestrator.default_priority == 5
    assert settings.orchestrator.max_retries == 3
    assert settings.orchestrator.sync_interval_s == 60
    assert settings.api.port == 8000
    assert settings.api.max_body_bytes == 1_048_576
    # And the embedded default needs no server
    assert settings.database.url == "sqlite:///var/aios.db"
    assert settings.broker.is_embedded
    assert settings == Settings()


def test_the_shipped_config_file_agrees_with_the_defaults():
    # Given the repository's config/aios.toml
    settings = load_settings(environ={"AIOS_CONFIG": str(REPO_CONFIG)})
    # Then it restates the defaults rather than changing them
    assert settings == Settings()


def test_the_toml_file_named_by_aios_config_is_applied(toml_file):
    # Given a config file that changes a few keys
    # When the settings are loaded with AIOS_CONFIG pointing at it
    settings = load_settings(environ={"AIOS_CONFIG": str(toml_file)})
    # Then those keys change and the others keep their defaults
    assert settings.api.port == 9001
    assert settings.api.host == "0.0.0.0"
    assert settings.orchestrator.default_priority == 7
    assert settings.orchestrator.max_retries == 1
    assert settings.agents.command_allowlist == ["ls"]
    assert settings.orchestrator.task_timeout_s == 3600


def test_the_environment_overrides_the_toml_file(toml_file):
    # Given a config file with api.port 9001 and default_priority 7
    # When the environment sets them too
    settings = load_settings(
        environ={
            "AIOS_CONFIG": str(toml_file),
            "AIOS_API__PORT": "8080",
            "AIOS_ORCHESTRATOR__DEFAULT_PRIORITY": "2",
        }
    )
    # Then the environment wins, key by key, and the rest of the file still applies
    assert settings.api.port == 8080
    assert settings.orchestrator.default_priority == 2
    assert settings.api.host == "0.0.0.0"
    assert settings.orchestrator.max_retries == 1


def test_an_environment_variable_sets_the_api_port(empty_toml):
    # Given AIOS_API__PORT=8080 / When loaded / Then the port is the integer 8080
    settings = load_settings(environ={"AIOS_CONFIG": str(empty_toml), "AIOS_API__PORT": "8080"})
    assert settings.api.port == 8080


def test_a_list_setting_in_the_environment_is_parsed_as_json(empty_toml):
    # Given the allowlist as a JSON list in the environment
    settings = load_settings(environ={"AIOS_CONFIG": str(empty_toml), "AIOS_AGENTS__COMMAND_ALLOWLIST": '["echo"]'})
    # Then it is a list of one name, not a string
    assert settings.agents.command_allowlist == ["echo"]


def test_environment_names_are_case_insensitive_after_the_prefix(empty_toml):
    # Given a lower-case section and key / Then they still address api.port
    settings = load_settings(environ={"AIOS_CONFIG": str(empty_toml), "AIOS_api__port": "8081"})
    assert settings.api.port == 8081


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [
        ("AIOS_API__PORT", "abc", "api.port"),
        ("AIOS_API__PORT", "70000", "api.port"),
        ("AIOS_ORCHESTRATOR__DEFAULT_PRIORITY", "10", "orchestrator.default_priority"),
        ("AIOS_ORCHESTRATOR__TASK_TIMEOUT_S", "0", "orchestrator.task_timeout_s"),
        ("AIOS_LOGGING__LEVEL", "LOUD", "logging.level"),
        ("AIOS_BROKER__NAMESPACE", "Has Spaces", "broker.namespace"),
        # this round's keys
        ("AIOS_API__REQUEST_READ_TIMEOUT_S", "0", "api.request_read_timeout_s"),
        ("AIOS_API__MAX_CONNECTIONS_PER_CLIENT", "-1", "api.max_connections_per_client"),
        ("AIOS_API__PAGE_MAX_WITH_BODIES", "0", "api.page_max_with_bodies"),
        ("AIOS_API__MAX_RESPONSE_BYTES", "abc", "api.max_response_bytes"),
        ("AIOS_API__SSE_MAX_STREAMS_PER_PRINCIPAL", "0", "api.sse_max_streams_per_principal"),
        ("AIOS_API__MAX_WAITS_PER_PRINCIPAL", "0", "api.max_waits_per_principal"),
        ("AIOS_AGENTS__COMMAND_PIDS", "0", "agents.command_pids"),
        ("AIOS_AGENTS__COMMAND_FILE_SIZE_MB", "0", "agents.command_file_size_mb"),
        ("AIOS_SECURITY__MAX_KEYS_PER_USER", "-1", "security.max_keys_per_user"),
        ("AIOS_BROKER__SOCKET_TIMEOUT_S", "0", "broker.socket_timeout_s"),
    ],
)
def test_a_bad_value_raises_a_config_error_naming_the_key(empty_toml, name, value, key):
    # Given a value the setting cannot take
    # When the settings are loaded
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"AIOS_CONFIG": str(empty_toml), name: value})
    # Then the error names the dotted key
    assert key in caught.value.message


def test_a_bad_value_in_the_toml_file_names_the_key(tmp_path):
    # Given a config file with a port that is not a number
    path = tmp_path / "bad.toml"
    path.write_text('[api]\nport = "abc"\n')
    # When loaded / Then the error names api.port
    with pytest.raises(ConfigError, match=r"api\.port"):
        load_settings(environ={"AIOS_CONFIG": str(path)})


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("AIOS_API__PROT", "api.prot"),
        ("AIOS_NOPE__PORT", "nope"),
        ("AIOS_ORCHESTRATOR__TIMEOUT", "orchestrator.timeout"),
    ],
)
def test_an_unknown_key_or_section_in_the_environment_is_an_error(empty_toml, name, fragment):
    # Given a typo in an environment variable name
    # When loaded / Then ConfigError names the variable rather than ignoring it
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"AIOS_CONFIG": str(empty_toml), name: "1"})
    assert name in caught.value.message
    assert fragment in caught.value.message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("[api]\nprot = 1\n", "api.prot"), ("[bogus]\nx = 1\n", "bogus")],
    ids=["unknown-key", "unknown-section"],
)
def test_an_unknown_key_or_section_in_the_toml_file_is_an_error(tmp_path, text, fragment):
    # Given a config file with a typo
    path = tmp_path / "typo.toml"
    path.write_text(text)
    # When loaded / Then ConfigError names it
    with pytest.raises(ConfigError, match=fragment):
        load_settings(environ={"AIOS_CONFIG": str(path)})


def test_variables_without_a_section_separator_are_not_settings(empty_toml):
    # Given AIOS_* variables that are not AIOS_<SECTION>__<KEY> (AIOS_CONFIG itself, test helpers)
    settings = load_settings(environ={"AIOS_CONFIG": str(empty_toml), "AIOS_TEST_PG_URL": "x"})
    # Then they are ignored
    assert settings == Settings()


@pytest.mark.parametrize("raw", ['["echo"', "echo", "[echo]"])
def test_bad_json_for_a_list_setting_is_an_error(empty_toml, raw):
    # Given a list setting whose value is not JSON
    # When loaded / Then ConfigError names the key and says it must be JSON
    with pytest.raises(ConfigError, match=r"agents\.command_allowlist must be JSON"):
        load_settings(environ={"AIOS_CONFIG": str(empty_toml), "AIOS_AGENTS__COMMAND_ALLOWLIST": raw})


def test_json_of_the_wrong_shape_for_a_list_setting_is_an_error(empty_toml):
    # Given valid JSON that is not a list
    # When loaded / Then the key is named
    with pytest.raises(ConfigError, match=r"agents\.command_allowlist"):
        load_settings(environ={"AIOS_CONFIG": str(empty_toml), "AIOS_AGENTS__COMMAND_ALLOWLIST": '{"a": 1}'})


@pytest.mark.parametrize("visibility", ["100", "3600", "3605"])
def test_a_redis_visibility_timeout_not_above_the_task_timeout_is_an_error(empty_toml, visibility):
    # Given a Redis broker whose visibility timeout does not exceed the longest task run
    # (task_timeout_s 3600 plus timeout_grace_s 5)
    environ = {
        "AIOS_CONFIG": str(empty_toml),
        "AIOS_BROKER__URL": "redis://127.0.0.1:6379/0",
        "AIOS_BROKER__VISIBILITY_TIMEOUT_S": visibility,
    }
    # When loaded / Then the process refuses to start, naming visibility_timeout_s
    with pytest.raises(ConfigError, match="visibility_timeout_s"):
        load_settings(environ=environ)


def test_a_redis_visibility_timeout_above_the_task_timeout_is_accepted(empty_toml):
    # Given a Redis broker whose visibility timeout exceeds task_timeout_s + grace
    settings = load_settings(
        environ={
            "AIOS_CONFIG": str(empty_toml),
            "AIOS_BROKER__URL": "redis://127.0.0.1:6379/0",
            "AIOS_BROKER__VISIBILITY_TIMEOUT_S": "3606",
        }
    )
    # Then it loads
    assert settings.broker.visibility_timeout_s == 3606


def test_the_visibility_timeout_check_follows_a_lowered_task_timeout(empty_toml):
    # Given a short task timeout, a visibility timeout below the default becomes fine
    settings = load_settings(
        environ={
            "AIOS_CONFIG": str(empty_toml),
            "AIOS_BROKER__URL": "redis://127.0.0.1:6379/0",
            "AIOS_BROKER__VISIBILITY_TIMEOUT_S": "120",
            "AIOS_ORCHESTRATOR__TASK_TIMEOUT_S": "60",
            "AIOS_ORCHESTRATOR__RETRY_BACKOFF_MAX_S": "60",
        }
    )
    assert settings.broker.visibility_timeout_s == 120


def test_a_retry_backoff_that_outlives_the_visibility_timeout_is_refused(empty_toml):
    # Given a retry delay longer than Redis keeps a countdown message invisible (kombu#337)
    # When loaded / Then the error names both keys
    with pytest.raises(ConfigError, match="retry_backoff_max_s .* broker.visibility_timeout_s"):
        load_settings(
            environ={
                "AIOS_CONFIG": str(empty_toml),
                "AIOS_BROKER__URL": "redis://127.0.0.1:6379/0",
                "AIOS_BROKER__VISIBILITY_TIMEOUT_S": "120",
                "AIOS_ORCHESTRATOR__TASK_TIMEOUT_S": "60",
            }
        )


def test_a_missing_explicit_config_file_is_an_error(tmp_path):
    # Given AIOS_CONFIG naming a file that does not exist
    # When loaded / Then ConfigError says so (no silent fallback to defaults)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(environ={"AIOS_CONFIG": str(tmp_path / "missing.toml")})


def test_a_config_file_that_is_not_toml_is_an_error(tmp_path):
    # Given a file that is not TOML / When loaded / Then ConfigError
    path = tmp_path / "broken.toml"
    path.write_text("[api\nport = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(environ={"AIOS_CONFIG": str(path)})


def test_loaded_settings_are_frozen(empty_toml):
    # Given loaded settings / When code tries to change one / Then it cannot
    settings = load_settings(environ={"AIOS_CONFIG": str(empty_toml)})
    with pytest.raises(ValueError, match="frozen"):
        settings.api.port = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- the CLI's exit status


def run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("AIOS_")}
    return subprocess.run(
        [sys.executable, "-m", "aios.cli", *args],
        env={**clean, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_cli_exits_2_and_names_the_key_on_a_bad_value(tmp_path):
    # Given AIOS_API__PORT=abc
    # When `aios config` runs
    done = run_cli(tmp_path, "config", AIOS_CONFIG=str(REPO_CONFIG), AIOS_API__PORT="abc")
    # Then it exits with status 2 and stderr names api.port
    assert done.returncode == 2, done.stderr
    assert "api.port" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_cli_exits_2_when_the_config_file_is_missing(tmp_path):
    # Given AIOS_CONFIG naming a file that does not exist
    # When `aios config` runs
    done = run_cli(tmp_path, "config", AIOS_CONFIG=str(tmp_path / "missing.toml"))
    # Then it exits with status 2 and says which file
    assert done.returncode == 2, done.stderr
    assert "missing.toml" in done.stderr


def test_the_cli_prints_the_effective_configuration_without_secrets(tmp_path):
    # Given a database URL with a password in the environment
    done = run_cli(
        tmp_path,
        "config",
        AIOS_CONFIG=str(REPO_CONFIG),
        AIOS_API__PORT="8080",
        AIOS_DATABASE__URL="postgresql+psycopg2://aios:s3cret@db.example/aios",
    )
    # When `aios config` runs / Then it succeeds, shows the override and hides the password
    assert done.returncode == 0, done.stderr
    assert '"port": 8080' in done.stdout
    assert "s3cret" not in done.stdout

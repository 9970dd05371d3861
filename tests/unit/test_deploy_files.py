"""The deployment files: docker/Dockerfile, docker/compose*.yml and config/systemd/.

Checked with the real tools where they exist: compose's own `config` (interpolation, schema, merge
of the files) and `systemd-analyze verify` / `security` on the units in a scratch root, plus
`systemd-sysusers` and `systemd-tmpfiles` applied to a scratch root. A missing tool skips on a
laptop and fails under CI=true (.ci/run installs them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from aios.config import Settings
from tests.conftest import requirement_missing

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER = REPO_ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
COMPOSE_FLOWER = DOCKER / "compose.flower.yml"
DOCKERFILE = DOCKER / "Dockerfile"
SYSTEMD = REPO_ROOT / "config" / "systemd"
UNITS = ["aios-api.service", "aios-worker@.service", "aios-beat.service", "aios-metrics.service"]
#: Groups the units: `systemctl start|stop|restart aios.target`.
TARGET = "aios.target"

#: The values compose refuses to run without; sentinels make them easy to find in the output.
REQUIRED = {
    "POSTGRES_PASSWORD": "pg-sentinel-3f9a",
    "REDIS_PASSWORD": "redis-sentinel-81c2",
    "AIOS_JWT_SECRET": "jwt-sentinel-" + "0" * 32,
    "AIOS_METRICS_TOKEN": "metrics-sentinel-token-5be1",
}
FLOWER_AUTH = "ops:flower-sentinel-77d0"
METRICS_TOKEN = REQUIRED["AIOS_METRICS_TOKEN"]
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH|TOKEN|_KEY\b|PASSPHRASE", re.IGNORECASE)


def require_tool(program: str, version_flag: str) -> list[str]:
    """``[program]`` if ``program version_flag`` exits 0; else skip, or fail under CI=true."""
    try:
        ok = subprocess.run([program, version_flag], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if ok:
        return [program]
    requirement_missing(program, "not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def compose_cmd() -> list[str]:
    """`docker compose` (v2 plugin) if present, else the `docker-compose` program (Debian's, v1)."""
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode == 0
    ):
        return ["docker", "compose"]
    return require_tool("docker-compose", "version")


def compose(compose_cmd, tmp_path, *files: Path, env: dict[str, str], args=("config",)):
    # An empty env file: a developer's docker/.env must not fill in what the test leaves out.
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    argv = [*compose_cmd, "--env-file", str(env_file), "--project-directory", str(DOCKER)]
    for file in files:
        argv += ["-f", str(file)]
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **env}
    return subprocess.run([*argv, *args], capture_output=True, text=True, env=clean, cwd=tmp_path, timeout=120)


def rendered(compose_cmd, tmp_path, *files, env, profiles=()) -> dict:
    args = [arg for profile in profiles for arg in ("--profile", profile)] + ["config"]
    result = compose(compose_cmd, tmp_path, *files, env=env, args=args)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


# ---- compose -------------------------------------------------------------------------------------


def test_compose_config_validates_with_the_secrets_given(compose_cmd, tmp_path):
    # Given every required secret
    config = rendered(compose_cmd, tmp_path, COMPOSE, env=REQUIRED, profiles=["metrics"])
    # Then compose accepts the file, with the promised services
    assert set(config["services"]) == {"postgres", "redis", "migrate", "api", "worker-1", "worker-2", "beat", "metrics"}
    # And the secrets reach the processes that need them
    api_env = config["services"]["api"]["environment"]
    assert api_env["AIOS_SECURITY__JWT_SECRET"] == REQUIRED["AIOS_JWT_SECRET"]
    assert REQUIRED["POSTGRES_PASSWORD"] in api_env["AIOS_DATABASE__URL"]
    assert REQUIRED["REDIS_PASSWORD"] in api_env["AIOS_BROKER__URL"]
    # And only the API gets the JWT key (least privilege)
    holders = {
        name
        for name, svc in config["services"].items()
        if REQUIRED["AIOS_JWT_SECRET"] in json.dumps(svc.get("environment") or {})
    }
    assert holders == {"api"}


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_compose_refuses_to_run_without_each_secret(compose_cmd, tmp_path, missing):
    # Given every secret but one
    env = {name: value for name, value in REQUIRED.items() if name != missing}
    # When compose renders the file
    result = compose(compose_cmd, tmp_path, COMPOSE, env=env)
    # Then it fails and names the missing variable: there is no default to fall back on
    assert result.returncode != 0, result.stdout
    assert missing in result.stderr, result.stderr


def test_flower_needs_its_basic_auth_but_the_main_stack_does_not(compose_cmd, tmp_path):
    # Without FLOWER_BASIC_AUTH the Flower overlay is refused, naming the variable
    refused = compose(compose_cmd, tmp_path, COMPOSE, COMPOSE_FLOWER, env=REQUIRED)
    assert refused.returncode != 0 and "FLOWER_BASIC_AUTH" in refused.stderr, refused.stderr
    # With it, Flower gets the credentials through its environment (never on a command line)
    env = {**REQUIRED, "FLOWER_BASIC_AUTH": FLOWER_AUTH}
    config = rendered(compose_cmd, tmp_path, COMPOSE, COMPOSE_FLOWER, env=env)
    flower = config["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == FLOWER_AUTH
    assert FLOWER_AUTH not in json.dumps(flower.get("command") or "") + json.dumps(flower.get("entrypoint") or "")
    assert flower["build"]["target"] == "flower"


def test_every_secret_in_the_rendered_stack_is_one_the_operator_gave(compose_cmd, tmp_path):
    # Given the whole stack rendered with sentinel secrets
    env = {**REQUIRED, "FLOWER_BASIC_AUTH": FLOWER_AUTH}
    config = rendered(compose_cmd, tmp_path, COMPOSE, COMPOSE_FLOWER, env=env, profiles=["metrics"])
    given = set(env.values())
    for name, service in config["services"].items():
        environment = service.get("environment") or {}
        for key, value in environment.items():
            # Then every secret-named variable holds a value from the operator, none from the file
            if SECRET_NAME.search(key):
                assert value in given, f"{name}: {key} has a value the operator did not give"
            # And every URL with a password carries the operator's password
            for match in re.finditer(r"://[^/@\s:]*:([^@\s]*)@", str(value)):
                assert match.group(1) in given, f"{name}: {key} embeds a password from the file"


def test_only_the_metrics_service_gets_the_metrics_token_and_its_healthcheck_sends_it(compose_cmd, tmp_path):
    # Given the stack with the metrics profile and its token
    services = rendered(compose_cmd, tmp_path, COMPOSE, env=REQUIRED, profiles=["metrics"])["services"]
    # Then `aios metrics` (on 0.0.0.0 in its container) gets it as its bearer token, and nobody else does
    assert services["metrics"]["environment"]["AIOS_METRICS__BEARER_TOKEN"] == METRICS_TOKEN
    holders = {name for name, svc in services.items() if METRICS_TOKEN in json.dumps(svc.get("environment") or {})}
    assert holders == {"metrics"}
    # And its healthcheck sends the token from the environment, not written in the file
    check = json.dumps(services["metrics"]["healthcheck"]["test"])
    assert "os.environ['AIOS_METRICS__BEARER_TOKEN']" in check and METRICS_TOKEN not in check


def test_every_service_has_a_healthcheck_or_waits_for_healthy_ones(compose_cmd, tmp_path):
    env = {**REQUIRED, "FLOWER_BASIC_AUTH": FLOWER_AUTH}
    config = rendered(compose_cmd, tmp_path, COMPOSE, COMPOSE_FLOWER, env=env, profiles=["metrics"])
    services = config["services"]
    for name, service in services.items():
        check = service.get("healthcheck")
        if name == "migrate":
            # The one-shot migration has no health: it waits for a healthy PostgreSQL and exits
            assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
            assert service["command"] == ["db", "upgrade"]
            continue
        assert check and not check.get("disable") and check.get("test"), f"{name} has no healthcheck"
    # And every AIOS process waits for the migration and for healthy PostgreSQL and Redis
    for name in ("api", "worker-1", "worker-2", "beat", "metrics"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["postgres"]["condition"] == depends["redis"]["condition"] == "service_healthy", name


def test_the_healthcheck_programs_are_valid_python(compose_cmd, tmp_path):
    env = {**REQUIRED, "FLOWER_BASIC_AUTH": FLOWER_AUTH}
    config = rendered(compose_cmd, tmp_path, COMPOSE, COMPOSE_FLOWER, env=env, profiles=["metrics"])
    snippets = [svc["healthcheck"]["test"] for svc in config["services"].values() if svc.get("healthcheck")]
    snippets.append(re.search(r"HEALTHCHECK[^\n]*\n\s*CMD (\[.*\])", DOCKERFILE.read_text()).group(1))
    programs = []
    for test in snippets:
        test = json.loads(test) if isinstance(test, str) else test
        if test[:2] == ["CMD", "python"] and test[2] == "-c":
            programs.append(test[3])
    assert len(programs) >= 4  # api, beat, metrics, flower, and the image's own
    for program in programs:
        compile(program, "<healthcheck>", "exec")


def test_two_agents_with_distinct_names_and_a_name_prefix_per_host(compose_cmd, tmp_path):
    config = rendered(compose_cmd, tmp_path, COMPOSE, env={**REQUIRED, "AIOS_NODE": "hostb"})
    names = []
    for service in ("worker-1", "worker-2"):
        command = config["services"][service]["command"]
        assert command[:2] == ["worker", "--name"]
        names.append(command[2])
        # The healthcheck pings the agent by the same name
        assert config["services"][service]["environment"]["AIOS_AGENT_NAME"] == command[2]
    assert names == ["hostb-worker-1", "hostb-worker-2"]


def test_nothing_without_credentials_is_published_beyond_localhost_by_default(compose_cmd, tmp_path):
    env = {**REQUIRED, "FLOWER_BASIC_AUTH": FLOWER_AUTH}
    config = rendered(compose_cmd, tmp_path, COMPOSE, COMPOSE_FLOWER, env=env, profiles=["metrics"])
    for name, service in config["services"].items():
        for port in service.get("ports") or []:
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).rsplit(":", 2)[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} on every interface"
        if name in ("postgres", "redis"):
            assert not service.get("ports"), f"{name} must not be published"


def test_compose_file_has_no_secret_defaults_in_its_text():
    # `${VAR:-default}` on a secret would defeat `:?`; a literal password would be worse.
    for file in (COMPOSE, COMPOSE_FLOWER):
        text = file.read_text()
        for match in re.finditer(r"\$\{(\w+)(:?[-?+])?", text):
            name, operator = match.group(1), match.group(2)
            if SECRET_NAME.search(name):
                assert operator == ":?", f"{file.name}: ${{{name}}} must be ${{{name}:?...}}"
    assert "FLOWER_BASIC_AUTH:?" in COMPOSE_FLOWER.read_text()


def test_the_env_example_holds_names_but_no_values():
    example = DOCKER / "aios.env.example"
    for line in example.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            assert SECRET_NAME.search(name) and value == "", line
    assert set(REQUIRED) | {"FLOWER_BASIC_AUTH"} <= {
        line.partition("=")[0] for line in example.read_text().splitlines() if not line.startswith("#")
    }
    assert "docker/.env" in (REPO_ROOT / ".gitignore").read_text().split()


# ---- Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    assert not current, "a continuation line ends the file"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in joined]


def stages() -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list[tuple[str, str]]] = {}
    name = None
    for instruction, args in dockerfile_instructions():
        if instruction == "FROM":
            parts = args.split()
            assert len(parts) == 3 and parts[1].upper() == "AS", f"every stage is named: FROM {args}"
            name = parts[2]
            assert name not in found, f"stage {name} twice"
            found[name] = [(instruction, args)]
        elif name is None:
            assert instruction == "ARG", f"{instruction} before the first FROM"
        else:
            found[name].append((instruction, args))
    return found


def test_the_dockerfile_is_multi_stage_and_the_runtime_is_the_default_target():
    found = stages()
    assert {"builder", "runtime", "flower"} <= set(found)
    assert list(found)[-1] == "runtime", "`docker build` without --target must give the AIOS image"
    # The compose targets exist
    for file in (COMPOSE, COMPOSE_FLOWER):
        for target in re.findall(r"target:\s*(\S+)", file.read_text()):
            assert target in found, f"{file.name} builds target {target}, which the Dockerfile lacks"


def test_runtime_images_run_as_the_non_root_aios_user_without_a_compiler():
    found = stages()

    def lineage(stage: str) -> list[str]:
        parent = found[stage][0][1].split()[0]
        return (lineage(parent) if parent in found else []) + [stage]

    for final in ("runtime", "flower"):
        chain = lineage(final)
        assert "builder" not in chain, f"{final} must not be built on the builder stage"
        instructions = [item for stage in chain for item in found[stage]]
        users = [args for instruction, args in instructions if instruction == "USER"]
        assert users and users[-1] == "aios", f"{final} ends as USER {users[-1:] or 'root'}"
        last_user = max(i for i, (instruction, _) in enumerate(instructions) if instruction == "USER")
        assert all(instruction not in {"RUN", "COPY", "ADD"} for instruction, _ in instructions[last_user + 1 :])
        runs = " ".join(args for instruction, args in instructions if instruction == "RUN")
        for compiler in ("build-essential", "gcc", "g++", "-dev "):
            assert compiler not in runs, f"{final} installs {compiler}"
        # Only the venv crosses over from a build stage
        for instruction, args in instructions:
            if instruction == "COPY" and "--from=" in args:
                assert args.split()[-1] == "/opt/aios" and args.split()[-2] == "/opt/aios", args
    runtime = dict((i, a) for i, a in found["runtime"])
    assert json.loads(runtime["ENTRYPOINT"]) == ["aios"]
    assert "HEALTHCHECK" in runtime and "/healthz" in runtime["HEALTHCHECK"]
    assert "useradd" in " ".join(a for i, a in found["base"] if i == "RUN")


def test_the_dockerfile_copies_only_what_exists_and_holds_no_secret():
    for instruction, args in dockerfile_instructions():
        if instruction in ("COPY", "ADD") and "--from=" not in args:
            sources = [part for part in args.split() if not part.startswith("--")][:-1]
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"{instruction} {source}: no such file in the repository"
        if instruction in ("ENV", "ARG"):
            for name, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S*)", args):
                assert not (SECRET_NAME.search(name) and value.strip('"')), f"{instruction} {name} has a value"
        # Exec forms are JSON arrays (a typo silently turns them into shell forms)
        if instruction in ("CMD", "ENTRYPOINT") or (instruction == "HEALTHCHECK" and " CMD [" in args):
            exec_form = args[args.index(" CMD [") + 5 :] if instruction == "HEALTHCHECK" else args
            assert isinstance(json.loads(exec_form), list), f"{instruction} {args}"
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "docker/.env"} <= set(ignored)
    assert "aios-*.whl" in DOCKERFILE.read_text()
    assert 'name = "aios"' in (REPO_ROOT / "pyproject.toml").read_text()  # the wheel glob's name


# ---- systemd -----------------------------------------------------------------------------------

#: Keys that may appear more than once in a section.
REPEATABLE = {
    "Environment",
    "EnvironmentFile",
    "LoadCredential",
    "SystemCallFilter",
    "ExecStartPre",
    "ReadWritePaths",
    "After",
    "Wants",
    "Requires",
}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A strict unit-file reader: sections, `Key=value`, no stray lines, no duplicated single-value keys."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith(("#", ";")):
            continue
        assert not line.rstrip().endswith("\\"), f"{path.name}:{number}: keep directives on one line"
        if line.startswith("["):
            current = line.strip()[1:-1]
            assert current not in sections, f"{path.name}: section [{current}] twice"
            sections[current] = {}
            continue
        assert current and "=" in line, f"{path.name}:{number}: not Key=value: {line!r}"
        key, value = (part.strip() for part in line.split("=", 1))
        assert key in REPEATABLE or key not in sections[current], f"{path.name}:{number}: {key} twice"
        sections[current].setdefault(key, []).append(value)
    return sections


def env_of(service: dict[str, list[str]]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in service.get("Environment", []))


@pytest.mark.parametrize("unit", UNITS)
def test_each_unit_runs_as_aios_hardened_with_config_and_secrets_from_etc_aios(unit):
    sections = parse_unit(SYSTEMD / unit)
    assert set(sections) == {"Unit", "Service", "Install"}
    service = {key: values[-1] for key, values in sections["Service"].items()}
    assert service["User"] == service["Group"] == "aios"
    assert service["ExecStart"].startswith("/opt/aios/bin/aios ")
    assert sections["Service"]["EnvironmentFile"] == ["/etc/aios/aios.env"]
    assert env_of(sections["Service"])["AIOS_CONFIG"] == "/etc/aios/aios.toml"
    assert service["Restart"] == "on-failure"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "UMask": "0027",
    }.items():
        assert service.get(key) == value, f"{unit}: {key}={service.get(key)!r}, want {value!r}"
    assert service["StateDirectory"] == service["LogsDirectory"] == "aios"
    # And it belongs to aios.target: enabled into it, and stopped/restarted with it
    assert sections["Install"]["WantedBy"] == [TARGET]
    assert sections["Unit"]["PartOf"] == [TARGET]


def test_aios_target_wants_the_api_and_beat_and_is_started_at_boot():
    sections = parse_unit(SYSTEMD / TARGET)
    assert set(sections) == {"Unit", "Install"}
    assert set(sections["Unit"]["Wants"][0].split()) == {"aios-api.service", "aios-beat.service"}
    assert sections["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_worker_unit_names_the_agent_after_its_instance_and_outwaits_the_longest_task():
    service = {key: values[-1] for key, values in parse_unit(SYSTEMD / "aios-worker@.service")["Service"].items()}
    assert service["ExecStart"] == "/opt/aios/bin/aios worker --name %i"
    # Warm shutdown: SIGTERM to Celery's main process only; the pool is killed after TimeoutStopSec
    assert service["KillMode"] == "mixed"
    defaults = Settings().orchestrator
    assert int(service["TimeoutStopSec"]) > defaults.task_timeout_s + defaults.timeout_grace_s


def test_the_api_unit_hands_the_jwt_key_over_as_a_credential():
    service = parse_unit(SYSTEMD / "aios-api.service")["Service"]
    name, _, source = service["LoadCredential"][0].partition(":")
    assert source == "/etc/aios/jwt.key"
    assert env_of(service)["AIOS_SECURITY__JWT_SECRET_FILE"] == f"/run/credentials/%n/{name}"


@pytest.fixture()
def scratch_root(tmp_path) -> Path:
    """A root with the system's own units (verify needs sysinit.target) and stand-in executables."""
    require_tool("systemd-analyze", "--version")
    system = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()), None)
    assert system is not None, "systemd is installed but has no unit directory"
    root = tmp_path / "root"
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in [*UNITS, TARGET]:
        shutil.copy(SYSTEMD / unit, root / "etc/systemd/system" / unit)
    for unit in UNITS:
        program = Path(parse_unit(SYSTEMD / unit)["Service"]["ExecStart"][0].split()[0])
        stand_in = root / program.relative_to("/")
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
    return root


def instance(unit: str) -> str:
    return unit.replace("@.", "@agent-1.")


def test_systemd_analyze_verify_passes_with_no_message(scratch_root):
    # When systemd verifies every unit (the template through an instance)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={scratch_root}", *map(instance, UNITS), TARGET],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Then it exits 0 and says nothing: an unknown key or a bad value is only a message, so none is allowed
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).strip() == ""


def test_enabling_aios_target_and_its_units_puts_them_all_under_the_target(scratch_root):
    require_tool("systemctl", "--version")
    # When the target, an agent and the metrics server are enabled (offline, in the scratch root)
    result = subprocess.run(
        [
            "systemctl",
            f"--root={scratch_root}",
            "enable",
            TARGET,
            "aios-api.service",
            "aios-beat.service",
            "aios-worker@agent-1.service",
            "aios-metrics.service",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Then the target starts at boot, and every unit starts with it (the agent under its instance name)
    etc = scratch_root / "etc/systemd/system"
    assert (etc / "multi-user.target.wants" / TARGET).is_symlink()
    wants = {path.name for path in (etc / "aios.target.wants").iterdir()}
    assert wants == {"aios-api.service", "aios-beat.service", "aios-worker@agent-1.service", "aios-metrics.service"}
    # And systemd finds nothing to say about the target with its units in place
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={scratch_root}", TARGET],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_rates_each_unit_exposure_ok(scratch_root, unit):
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", f"--root={scratch_root}", "--no-pager", instance(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    # systemd's scale: < 4.0 is "OK" (the best band, below MEDIUM, EXPOSED, UNSAFE)
    assert float(match.group(1)) < 4.0 and match.group(2) == "OK", match.group(0)


def test_sysusers_and_tmpfiles_make_the_user_and_enforce_the_documented_modes(tmp_path):
    require_tool("systemd-tmpfiles", "--version")
    require_tool("systemd-sysusers", "--version")
    root = tmp_path / "root"
    (root / "etc/aios").mkdir(parents=True)
    # Given an installation whose files came out world-readable
    for name in ("aios.toml", "aios.env", "jwt.key"):
        (root / "etc/aios" / name).write_text("x")
        (root / "etc/aios" / name).chmod(0o644)
    # When the shipped sysusers.d and tmpfiles.d entries are applied
    for argv in (
        ["systemd-sysusers", f"--root={root}", str(SYSTEMD / "aios.sysusers.conf")],
        ["systemd-tmpfiles", f"--root={root}", "--create", str(SYSTEMD / "aios.tmpfiles.conf")],
    ):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
    # Then the aios user and group exist, and the modes are those the docs ask for
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    group = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    assert passwd["aios"][5] == "/var/lib/aios" and passwd["aios"][6] == "/usr/sbin/nologin"
    aios_uid, aios_gid = int(passwd["aios"][2]), int(group["aios"][2])

    def mode_owner(relative: str) -> tuple[str, int, int]:
        status = (root / relative).stat()
        return oct(status.st_mode & 0o7777), status.st_uid, status.st_gid

    assert mode_owner("etc/aios") == ("0o750", 0, aios_gid)
    assert mode_owner("etc/aios/aios.toml") == ("0o640", 0, aios_gid)
    assert mode_owner("etc/aios/aios.env") == ("0o600", 0, 0)
    assert mode_owner("etc/aios/jwt.key") == ("0o600", 0, 0)
    assert mode_owner("var/lib/aios") == ("0o750", aios_uid, aios_gid)
    assert mode_owner("var/log/aios") == ("0o750", aios_uid, aios_gid)

"""Redis Sentinel settings: the config rules, and what kombu and AIOS's own Redis clients are given."""

from __future__ import annotations

import pytest

from aios.config import BrokerSettings, load_settings, redact_url
from aios.errors import ConfigError
from tests.unit.test_config import run_cli

SENTINELS = "sentinel://h1:26379;sentinel://h2:26379;sentinel://h3:26379"


@pytest.fixture()
def empty_toml(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    return path


def test_a_sentinel_url_with_its_master_name_loads(empty_toml):
    # Given the Sentinel form of the issue, with the master's name in the environment
    settings = load_settings(
        environ={
            "AIOS_CONFIG": str(empty_toml),
            "AIOS_BROKER__URL": SENTINELS,
            "AIOS_BROKER__SENTINEL_MASTER": "aios",
        }
    )
    # Then it is a Redis broker found through Sentinel
    assert settings.broker.is_sentinel and settings.broker.is_redis
    assert settings.broker.sentinel_master == "aios"


def test_a_sentinel_url_without_a_master_name_is_refused_naming_the_key(empty_toml):
    # Given a sentinel:// URL and no broker.sentinel_master
    environ = {"AIOS_CONFIG": str(empty_toml), "AIOS_BROKER__URL": SENTINELS}
    # When loaded / Then the process refuses to start, naming the setting and its variable
    with pytest.raises(ConfigError, match=r"broker\.sentinel_master \(env AIOS_BROKER__SENTINEL_MASTER\)"):
        load_settings(environ=environ)


def test_a_master_name_without_a_sentinel_url_is_refused(empty_toml):
    # Given a master name but a plain Redis URL
    environ = {
        "AIOS_CONFIG": str(empty_toml),
        "AIOS_BROKER__URL": "redis://127.0.0.1:6379/0",
        "AIOS_BROKER__SENTINEL_MASTER": "aios",
    }
    # Then it is refused rather than silently ignored
    with pytest.raises(ConfigError, match="not a sentinel:// URL"):
        load_settings(environ=environ)


@pytest.mark.parametrize("url", ["sentinel://h1:26379;redis://h2:6379", "sentinel://h1:26379;sentinel://"])
def test_a_sentinel_url_with_a_part_that_is_no_sentinel_is_refused(empty_toml, url):
    environ = {"AIOS_CONFIG": str(empty_toml), "AIOS_BROKER__URL": url, "AIOS_BROKER__SENTINEL_MASTER": "aios"}
    with pytest.raises(ConfigError, match="every part of a Sentinel URL"):
        load_settings(environ=environ)


def test_the_cli_exits_2_on_a_sentinel_url_without_a_master_name(tmp_path):
    # Given the Sentinel URL alone
    # When `aios config` runs
    result = run_cli(tmp_path, "config", AIOS_BROKER__URL=SENTINELS)
    # Then it stops with status 2 and says which setting is missing
    assert result.returncode == 2, result.stdout + result.stderr
    assert "AIOS_BROKER__SENTINEL_MASTER" in result.stderr, result.stderr


def test_the_cli_hides_the_sentinel_password(tmp_path):
    result = run_cli(
        tmp_path,
        "config",
        AIOS_BROKER__URL="sentinel://:masterpw@h1:26379;sentinel://h2:26379",
        AIOS_BROKER__SENTINEL_MASTER="aios",
        AIOS_BROKER__SENTINEL_PASSWORD="sentinelpw",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sentinelpw" not in result.stdout and "masterpw" not in result.stdout, result.stdout


def test_every_part_of_a_sentinel_url_is_redacted():
    assert redact_url("sentinel://:pw@h1:26379/0;sentinel://:pw@h2:26379/0").count("pw@") == 0


def test_kombu_gets_the_password_database_and_tls_options_on_every_part():
    from aios.broker.redis_clients import kombu_url

    # Given credentials and TLS options written once, on the first part
    broker = BrokerSettings(
        url="sentinel://:pw@h1:26379/2?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem;sentinel://h2:26379;sentinel://h3",
        sentinel_master="aios",
    )
    # Then kombu, which re-reads them from whichever part it moves to after an error, finds them on each
    assert kombu_url(broker).split(";") == [
        "sentinel://:pw@h1:26379/2?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem",
        "sentinel://:pw@h2:26379/2?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem",
        "sentinel://:pw@h3/2?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem",
    ]
    # And a plain URL is left as it is
    assert kombu_url(BrokerSettings(url="redis://:pw@h:6379/0")) == "redis://:pw@h:6379/0"


def test_the_sentinel_target_reads_kombus_form():
    from aios.broker.redis_clients import sentinel_target

    target = sentinel_target("sentinel://user:pw@h1:26380/3?ssl_cert_reqs=required;sentinel://h2")
    assert target.sentinels == [("h1", 26380), ("h2", 26379)]
    assert (target.username, target.password, target.db) == ("user", "pw", 3)
    assert target.tls == {"ssl_cert_reqs": "required"}


def test_celery_gets_the_master_name_and_the_sentinels_own_password(empty_toml):
    from aios.broker.celery_app import create_celery_app

    # Given a Sentinel broker whose Sentinels have a password of their own
    broker = {
        "url": "sentinel://:pw@h1:26379;sentinel://h2:26379",
        "sentinel_master": "aios",
        "sentinel_password": "spw",
    }
    settings = load_settings(environ={"AIOS_CONFIG": str(empty_toml)}, overrides={"broker": broker})
    options = create_celery_app(settings).conf.broker_transport_options
    # Then kombu's Sentinel transport gets the master's name and how to reach the Sentinels
    assert options["master_name"] == "aios"
    assert options["sentinel_kwargs"]["password"] == "spw"
    # And the Redis options of any Redis broker (priorities, the unacked sweep)
    assert options["queue_order_strategy"] == "priority"


def test_an_agent_keeps_its_deferred_acks_behind_sentinel():
    from kombu import transport

    from workers import redis_transport

    # When an agent installs its transports
    saved = {scheme: transport.TRANSPORT_ALIASES.get(scheme) for scheme in redis_transport.SCHEMES}
    try:
        redis_transport.install()
        cls = transport.resolve_transport("sentinel")
        # Then sentinel:// is kombu's Sentinel transport with the deferred-ack QoS
        assert issubclass(cls, transport.redis.SentinelTransport)
        assert cls.Channel.QoS is redis_transport.DeferredAckQoS
    finally:
        for scheme, alias in saved.items():
            transport.TRANSPORT_ALIASES[scheme] = alias
            getattr(transport, "_transport_cache", {}).pop(scheme, None)

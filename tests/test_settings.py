"""Settings come from the environment once, fail fast, and never leak passwords."""

from __future__ import annotations

import pytest

from worker.errors import ConfigurationError
from worker.settings import load_settings, mask_url

pytestmark = pytest.mark.quick


def test_plain_postgresql_url_selects_psycopg2():
    settings = load_settings({"DATABASE_URL": "postgresql://u:p@db:5432/ws"})

    assert settings.database_url == "postgresql+psycopg2://u:p@db:5432/ws"


def test_no_configuration_gives_the_embedded_setup_under_var():
    settings = load_settings({})

    assert settings.database_url == "sqlite:///var/writing-sessions.db"
    assert settings.broker_url.startswith("sqla+sqlite:///var/")
    assert settings.result_backend and settings.result_backend.startswith("db+sqlite:///var/")
    assert settings.embedded


def test_a_bad_integer_names_the_variable():
    with pytest.raises(ConfigurationError, match="CELERY_VISIBILITY_TIMEOUT must be an integer"):
        load_settings({"CELERY_VISIBILITY_TIMEOUT": "soon"})


def test_an_unsupported_database_names_the_variable():
    with pytest.raises(
        ConfigurationError, match="DATABASE_URL must be a postgresql:// or sqlite://"
    ):
        load_settings({"DATABASE_URL": "mysql://root@localhost/ws"})


def test_sql_echo_is_off_unless_asked_for():
    assert load_settings({}).sql_echo is False
    assert load_settings({"SQL_ECHO": "1"}).sql_echo is True


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg2://user:hunter2@db/ws",
        "redis://:hunter2@redis:6379/0",
        "amqp://user:hunter2@rabbit:5672//",
    ],
)
def test_mask_url_hides_the_password(url):
    masked = mask_url(url)

    assert "hunter2" not in masked
    assert "***" in masked


SENTINELS = "sentinel://:pw@10.0.0.1:26379;sentinel://:pw@10.0.0.2:26379/0"


def test_a_sentinel_broker_takes_its_master_name_from_the_setting_or_the_url():
    from_setting = load_settings(
        {"CELERY_BROKER_URL": SENTINELS, "CELERY_BROKER_MASTER_NAME": "primary"}
    )
    from_url = load_settings({"CELERY_BROKER_URL": f"{SENTINELS}?master_name=from-url"})

    assert from_setting.broker_master_name == "primary"
    assert from_url.broker_master_name == "from-url"


def test_a_sentinel_broker_without_a_master_name_names_the_setting():
    with pytest.raises(ConfigurationError, match="CELERY_BROKER_MASTER_NAME"):
        load_settings({"CELERY_BROKER_URL": SENTINELS})


def test_mask_url_hides_the_password_of_every_sentinel():
    assert mask_url(SENTINELS) == "sentinel://:***@10.0.0.1:26379;sentinel://:***@10.0.0.2:26379/0"

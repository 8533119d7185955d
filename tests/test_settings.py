"""Settings are validated once, when read: a value that would break every image later is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.errors import ConfigurationError
from jobs.settings import load_settings, stack_file


@pytest.mark.parametrize("name, value, message", [
    ("DEBLUR_IMAGE_MAX_ATTEMPTS", "0", "DEBLUR_IMAGE_MAX_ATTEMPTS must be >= 1"),
    ("DEBLUR_IMAGE_MAX_PIXELS", "0", "DEBLUR_IMAGE_MAX_PIXELS must be >= 1"),
    ("DEBLUR_API_PORT", "70000", "must be a port"),
    ("DEBLUR_TASK_MAX_RETRIES", "-1", "DEBLUR_TASK_MAX_RETRIES must be >= 0"),
    ("DEBLUR_QUEUE", "  ", None),  # blank: unset, so the default queue
    ("DEBLUR_DEVICE", "gpu", "expected auto, cpu, cuda, cuda:N or mps"),
])
def test_values_that_would_break_later_are_refused_now(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str,
                                                       value: str, message: str | None) -> None:
    monkeypatch.setenv("DEBLUR_HOME", str(tmp_path))
    monkeypatch.setenv(name, value)
    if message is None:
        assert load_settings().queue == "deblur"
        return
    with pytest.raises(ConfigurationError, match=message):
        load_settings()


def test_an_empty_variable_does_not_hide_the_local_stacks_value(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """'DEBLUR_DATABASE_URL=' once meant the default SQLite file instead of the running stack's database."""
    monkeypatch.setenv("DEBLUR_HOME", str(tmp_path))
    stack_file().parent.mkdir(parents=True)
    stack_file().write_text(json.dumps({"database_url": "sqlite:////stack/deblur.db"}))
    monkeypatch.setenv("DEBLUR_DATABASE_URL", "")
    assert load_settings().database_url == "sqlite:////stack/deblur.db"
    monkeypatch.setenv("DEBLUR_DEVICE", "CUDA:1")
    assert load_settings().device == "CUDA:1"  # read case-insensitively by the device picker


def test_config_shows_no_password_or_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """'deblur config' printed the broker's password and DEBLUR_NOTIFY_SECRET as typed; its output is what
    operators paste into tickets (deploy/alerts.yml sends them to it)."""
    from click.testing import CliRunner

    from producer.cli import main

    import producer.cli

    monkeypatch.setenv("DEBLUR_HOME", str(tmp_path))
    monkeypatch.setattr(producer.cli.out, "width", 400)  # no value cut short with '…' or wrapped
    env = {"DEBLUR_BROKER_URL": "redis://:redispw@127.0.0.1:6390/0", "DEBLUR_NOTIFY_SECRET": "notifysecret",
           "DEBLUR_DATABASE_URL": "postgresql+psycopg://postgres:hunter2@127.0.0.1:5432/x",
           "DEBLUR_API_TOKEN": "apitoken", "DEBLUR_FLOWER_BASIC_AUTH": "admin:flowerpw"}
    result = CliRunner().invoke(main, ["config"], env=env)
    assert result.exit_code == 0, result.output
    for secret in ("redispw", "notifysecret", "hunter2", "apitoken", "flowerpw"):
        assert secret not in result.output, secret
    assert "redis://:***@127.0.0.1:6390/0" in result.output

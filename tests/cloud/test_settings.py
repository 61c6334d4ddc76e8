"""Cloud settings are validated once; a default secret outside dev mode is refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cloud.settings import DEV_ADMIN_TOKEN, CloudSettings


def test_the_built_in_token_is_refused_outside_dev_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFLEET_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("EDGEFLEET_DEV_MODE", raising=False)
    with pytest.raises(ValidationError, match="built-in development token"):
        CloudSettings()
    assert CloudSettings(dev_mode=True).admin_token == DEV_ADMIN_TOKEN


def test_short_tokens_and_unknown_settings_are_refused() -> None:
    with pytest.raises(ValidationError, match="at least 16"):
        CloudSettings(admin_token="short")
    with pytest.raises(ValidationError, match="Extra inputs"):
        CloudSettings(dev_mode=True, no_such_setting=1)  # type: ignore[call-arg]


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN", "x" * 32)
    monkeypatch.setenv("EDGEFLEET_DATABASE_URL", "postgresql://db/edgefleet")
    settings = CloudSettings()
    assert settings.resolved_database_url == "postgresql://db/edgefleet"
    assert not settings.dev_mode

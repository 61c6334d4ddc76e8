"""`edgefleet` logs our own packages at INFO and third-party libraries from WARNING;
`--verbose` adds third-party INFO lines and our own DEBUG lines."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from cloud.cli import OWN_LOGGERS, configure_logging

THIRD_PARTY = ("httpx", "alembic.runtime.migration", "onnxruntime.quantization", "root")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in OWN_LOGGERS}
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)


def _logger(name: str) -> logging.Logger:
    # onnxruntime's quantizer logs "Increased scale ..." with logging.info(): the root logger.
    return logging.getLogger() if name == "root" else logging.getLogger(name)


@pytest.mark.usefixtures("restore_logging")
def test_by_default_only_our_loggers_say_info() -> None:
    configure_logging()
    for name in THIRD_PARTY:
        assert not _logger(name).isEnabledFor(logging.INFO), name
        assert _logger(name).isEnabledFor(logging.WARNING), name
    for name in ("cloud.launcher", "cloud.pipeline.service", "shared.mqtt_link"):
        assert logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name


@pytest.mark.usefixtures("restore_logging")
def test_verbose_shows_third_party_info_and_configuring_twice_keeps_one_handler() -> None:
    configure_logging()
    configure_logging(verbose=True)
    for name in THIRD_PARTY:
        assert _logger(name).isEnabledFor(logging.INFO), name
    # --verbose used to leave our own loggers at INFO: their debug lines (tracebacks of the
    # errors the CLI sums up in one line among them) never showed.
    for name in ("cloud.launcher", "cloud.demo.agents", "shared.mqtt_link"):
        assert logging.getLogger(name).isEnabledFor(logging.DEBUG), name
    ours = [h for h in logging.getLogger().handlers if type(h).__module__ == "cloud.cli"]
    assert len(ours) == 1

"""Logging for ``infercache serve``: the ``infercache`` loggers get a handler of their own.

uvicorn configures its own loggers only. Ours fell through to Python's last-resort handler:
WARNING and above, bare text with no time, level or process, so with ``--workers N`` nobody could
tell which worker wrote a line, and the INFO line a recovered tier writes ("answers again: circuit
closed", which docs/server.md promises) never appeared. The same ``--log-level`` now applies to
both, and every line names its level, logger and process id.
"""

from __future__ import annotations

import copy
import logging.config
from typing import Any

__all__ = ["FORMAT", "configure", "uvicorn_log_config"]

FORMAT = "%(asctime)s %(levelname)s [pid %(process)d] %(name)s: %(message)s"


def _ours(log_level: str) -> dict[str, Any]:
    level = "DEBUG" if log_level == "trace" else log_level.upper()
    return {
        "formatters": {"infercache": {"format": FORMAT}},
        "handlers": {
            "infercache": {
                "class": "logging.StreamHandler",
                "formatter": "infercache",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {"infercache": {"handlers": ["infercache"], "level": level, "propagate": False}},
    }


def configure(log_level: str) -> None:
    """Set up the ``infercache`` loggers in this process (the command itself, before uvicorn
    starts: its start-up checks log too)."""
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False, **_ours(log_level)})


def uvicorn_log_config(log_level: str) -> dict[str, Any]:
    """uvicorn's default logging config with ours added: uvicorn applies it in every worker."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for section, entries in _ours(log_level).items():
        config.setdefault(section, {}).update(entries)
    return config

"""epkern's logger, ``logging.getLogger("epkern")``: quiet unless configured.

The logger carries a ``NullHandler``, so nothing is printed unless the application configures logging (its
own handlers see epkern's records through propagation) or ``EPKERN_LOG_LEVEL`` is set: then, on the first
:func:`get_logger` call of the process, a stderr handler at that level is attached (once). Only the
one-time paths log (a kernel compile, a disk-cache hit, a module load); no per-call path calls the logger.
"""

from __future__ import annotations

import logging
import threading

from . import _env

LOGGER_NAME = "epkern"
FORMAT = "%(asctime)s epkern[%(process)d] %(levelname)s %(threadName)s: %(message)s"

logger = logging.getLogger(LOGGER_NAME)
logger.addHandler(logging.NullHandler())

_lock = threading.Lock()
_configured = False


def get_logger() -> logging.Logger:
    """The ``epkern`` logger, with ``EPKERN_LOG_LEVEL`` applied on the first call (ConfigError for a bad value,
    raised again on every call until it is fixed)."""
    if not _configured:
        _configure()
    return logger


def _configure() -> None:
    global _configured
    with _lock:
        if _configured:
            return
        level = _env.log_level()
        if level is not None:
            handler = logging.StreamHandler()  # sys.stderr
            handler.setFormatter(logging.Formatter(FORMAT))
            handler.setLevel(level)
            logger.addHandler(handler)
            logger.setLevel(level)
        _configured = True

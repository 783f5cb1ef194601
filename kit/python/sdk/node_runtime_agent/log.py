"""Structured log lines through the node (the world's `log` interface):
`log.info("classified", category="Utilities")`. Field values are turned
into text with `str`. The node tags each line with the run's ids and caps
the volume per run."""

from wit_world.imports import log as _log

_Level = _log.Level


def _emit(level, message, fields):
    _log.log(level, str(message), [(str(key), str(value)) for key, value in fields.items()])


def trace(message, **fields):
    _emit(_Level.TRACE, message, fields)


def debug(message, **fields):
    _emit(_Level.DEBUG, message, fields)


def info(message, **fields):
    _emit(_Level.INFO, message, fields)


def warn(message, **fields):
    _emit(_Level.WARN, message, fields)


def error(message, **fields):
    _emit(_Level.ERROR, message, fields)

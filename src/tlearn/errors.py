"""Problems a user can fix. The CLI prints these as one line and exits 2; anything else is a bug (traceback, 1).

Every stage raises a subclass of TlearnError whose message says what is wrong and what to do about it.
"""
from __future__ import annotations

from importlib import util


class TlearnError(Exception):
    """A problem with the user's data, model folder, settings or installation, explained in the message."""


class DatasetError(TlearnError):
    """The dataset folder cannot be used as given."""


class BundleError(TlearnError):
    """A folder that is not a usable tlearn model (missing, edited, truncated or malformed files)."""


class EngineError(TlearnError):
    """An inference engine cannot run this model at this precision here."""


class WeightsUnavailable(TlearnError):
    """The backbone's pretrained weights are not on this machine."""


class OutputError(TlearnError):
    """An output cannot be written where it was asked: the disk is full or read-only, or writing is not allowed."""


class InvalidParameter(TlearnError, ValueError):
    """A setting outside its allowed values."""


class NotFittedError(TlearnError):
    """The classifier has no trained model yet: call fit() or tlearn.load()."""


class MissingExtra(TlearnError):
    """A command needs an optional part of tlearn that is not installed."""


def require(module: str, extra: str, purpose: str) -> None:
    """Raise MissingExtra unless `module` can be imported: `purpose` needs the `extra` of tlearn."""
    if util.find_spec(module) is None:
        raise MissingExtra(f"{purpose} needs {module}, which comes with tlearn's `{extra}` extra: "
                           f"pip install 'tlearn[{extra}]'")


def check_range(name: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False):
    """`value` if low <= value <= high (or < for an open end), else InvalidParameter naming the parameter."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or value != value:  # value != value: NaN
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise InvalidParameter(f"{name} must be {' and '.join(b for b in (lo, hi) if b)}, not {value!r}")
    return value


def check_choice(name: str, value: str, choices) -> str:
    if value not in choices:
        raise InvalidParameter(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return value

"""The library's user errors: bad input, worded for whoever gave it.

Everything rnnreg raises about its caller's input (a value out of range, a corpus that is not
there, a run directory that cannot be resumed) is an :class:`RnnregError`; any other exception
is a bug and keeps its traceback. A ValueError, so a caller's ``except ValueError`` still
catches it.

A message names the parameters it concerns in backquotes: ```strategy_p``` or, with a value,
```optimizer='sgd'```. ``str(error)`` words them as Python does (``strategy_p``,
``optimizer='sgd'``); :meth:`RnnregError.worded` lets a front end word them its own way, as the
command line does with flags (``--dropout``, ``--optimizer sgd``): one message, written once.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["RnnregError", "python_name", "reword"]

# A parameter named in a message: `name` or `name=value` (a value without spaces or backquotes).
_PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`\s]+))?`")


def python_name(name: str, value: str | None) -> str:
    """A parameter as a Python caller writes it: ``strategy_p``, ``optimizer='sgd'``."""
    return name if value is None else f"{name}={value}"


def reword(message: str, name: Callable[[str, str | None], str]) -> str:
    """``message`` with each parameter it names in backquotes written as
    ``name(parameter, value)`` (value None where the message gives none)."""
    return _PARAMETER.sub(lambda match: name(match[1], match[2]), message)


class RnnregError(ValueError):
    """Bad input to rnnreg, with what is wrong and what to do about it, in one line."""

    def __str__(self) -> str:
        return self.worded(python_name)

    @property
    def message(self) -> str:
        """The message as raised, its parameters still marked: what an error that wraps this
        one puts in its own message, so a front end still words them."""
        return str(self.args[0]) if self.args else ""

    def worded(self, name: Callable[[str, str | None], str]) -> str:
        """The message, its parameters worded by ``name`` (:func:`reword`)."""
        return reword(self.message, name)

    @property
    def parameters(self) -> tuple[str, ...]:
        """The parameters the message names, in order, each once."""
        return tuple(dict.fromkeys(match[1] for match in _PARAMETER.finditer(self.message)))

"""Building the C++ loops on first use: announced before the wait, and a failure falls back.

The build takes tens of seconds on a laptop, inside whatever first runs a layer that needs the
own loop; a user must not see a silent pause, and a machine without a compiler must still run
(the Python loops). torch's builder is replaced by a stand-in, so nothing is compiled here.
"""

from __future__ import annotations

import sys

import pytest
from torch.utils import cpp_extension

from rnnreg.nn.loops import cpp


def _failing_build(*args, **kwargs):
    print("the compiler starts", file=sys.stderr)
    raise RuntimeError("no C++ compiler")


def test_a_first_build_is_announced_before_it_starts(monkeypatch, capsys):
    monkeypatch.setattr(cpp, "_already_built", lambda extension: False)
    monkeypatch.setattr(cpp_extension, "load", _failing_build)
    with pytest.warns(RuntimeWarning):
        cpp._build_and_check()
    err = capsys.readouterr().err
    assert "compiling its C++ recurrence loops" in err
    assert err.index("compiling its C++") < err.index("the compiler starts")


def test_an_existing_build_loads_without_the_notice(monkeypatch, capsys):
    monkeypatch.setattr(cpp, "_already_built", lambda extension: True)
    monkeypatch.setattr(cpp_extension, "load", _failing_build)
    with pytest.warns(RuntimeWarning):
        cpp._build_and_check()
    assert "compiling its C++" not in capsys.readouterr().err


def test_a_failed_build_leaves_the_python_loops_with_a_warning(monkeypatch):
    monkeypatch.setattr(cpp, "_already_built", lambda extension: True)
    monkeypatch.setattr(cpp_extension, "load", _failing_build)
    with pytest.warns(RuntimeWarning, match="could not compile its C\\+\\+ loops.*no C\\+\\+ "
                                             "compiler"):
        assert cpp._build_and_check() is None

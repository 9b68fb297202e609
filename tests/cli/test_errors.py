"""The library speaks Python: its user errors name parameters, the command line words them as
flags, and the library's own strings name no command-line flag but a few, each for a reason."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from rnnreg import cli
from rnnreg.cli.flags import flag, worded
from rnnreg.errors import RnnregError
from rnnreg.lm.config import Config
from rnnreg.lm.corpus.sources import DataError
from rnnreg.lm.rundir.files import RunDirError
from rnnreg.lm.training.loop import TrainingDiverged

PACKAGE = Path(__file__).resolve().parents[2] / "rnnreg"

# A flag as it appears in text: "--out", "--data-dir DIR".
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")

# The library's strings (outside rnnreg/cli) that may name one of rnnreg's flags, each with
# why: (module, the first flag the string names).
ALLOWED = {
    # The command that fetches PTB again, for a corrupt download: a shell line to copy.
    ("lm/corpus/sources.py", "--data-dir"),
    # Printed while the first run downloads PTB, which only a command-line start asks for.
    ("lm/corpus/sources.py", "--no-download"),
    # Printed when the command that started a finished run is run again: what to change in it.
    ("lm/training/console.py", "--epochs"),
    # A note in the study's report (a document a reader regenerates with `rnnreg compare`).
    ("study/report.py", "--data-dir"),
}


def rnnreg_flags() -> set[str]:
    """Every long option of every rnnreg command."""
    parser = cli._parser()
    parsers = [parser, *parser.commands.values()]
    return {option for each in parsers for action in each._actions
            for option in action.option_strings if option.startswith("--")}


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes: prose for developers, not text a caller is shown."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _built_flag(node: ast.AST) -> bool:
    """A flag made from a name: f"--{name}" or "--" + name."""
    def dashes(part):
        return (isinstance(part, ast.Constant) and isinstance(part.value, str)
                and re.search(r"(?<![\w-])--$", part.value))
    if isinstance(node, ast.JoinedStr):
        return any(dashes(part) and isinstance(after, ast.FormattedValue)
                   for part, after in zip(node.values, node.values[1:]))
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and bool(dashes(node.left))


def flag_strings(source: str, flags: set[str]) -> list[tuple[int, str]]:
    """(line, first flag) of every string literal in ``source`` that names one of ``flags``,
    or builds a flag from a name ("--{...}")."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if _built_flag(node):
            found.append((node.lineno, "--{...}"))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings):
            named = [text for text in _FLAG.findall(node.value) if text in flags]
            if named:
                found.append((node.lineno, named[0]))
    return found


def library_flag_strings() -> list[tuple[str, int, str]]:
    """(module, line, flag) of every string outside rnnreg/cli that names an rnnreg flag."""
    flags = rnnreg_flags()
    return [(module, line, text)
            for path in sorted(PACKAGE.rglob("*.py"))
            if not (module := path.relative_to(PACKAGE).as_posix()).startswith("cli/")
            for line, text in flag_strings(path.read_text(encoding="utf-8"), flags)]


def test_the_library_names_command_line_flags_only_where_allowed():
    found = library_flag_strings()
    unexpected = [(module, line, text) for module, line, text in found
                  if (module, text) not in ALLOWED]
    assert not unexpected, f"name the Python parameter in backquotes instead: {unexpected}"
    assert len(found) <= 5, found
    assert {(module, text) for module, _, text in found} == ALLOWED  # none allowed in vain


def test_the_scan_finds_flags_in_plain_and_formatted_strings():
    flags = {"--lr", "--out"}
    assert [text for _, text in flag_strings('raise ValueError("lower --lr")', flags)] == [
        "--lr"]
    for built in ('x = "--" + name', 'x = f"--{name}"', 'x = f"use --{name} {value}"'):
        assert [text for _, text in flag_strings(built, flags)] == ["--{...}"], built
    other_programs = 'git(["--porcelain"]); plot(linestyle="--"); f"a--{b}"; "--outer"'
    assert flag_strings(other_programs, flags) == []
    assert flag_strings('def f():\n    """Resume with --out."""\n', flags) == []


# Every Config field that Config itself checks, with a value it refuses (and the settings
# that make the value wrong, where it is wrong only beside another).
INVALID = {
    "level": ("sentence", {}),
    "split_fractions": ((0.5, 0.5), {}),
    "max_vocab": (0, {}),
    "min_count": (0, {}),
    "cell": ("transformer", {}),
    "hidden_size": (0, {}),
    "num_layers": (0, {}),
    "embedding_size": (0, {}),
    "layer_sizes": ((8, 0), {}),
    "tie_weights": (True, {"embedding_size": 3}),
    "init_range": (0.0, {}),
    "softmax": ("hierarchical", {}),
    "adaptive_cutoffs": ((5, 3), {}),
    "adaptive_div_value": (0.5, {}),
    "strategy": ("bogus", {}),
    "strategy_p": (1.5, {}),
    "input_dropout": (1.5, {}),
    "between_dropout": (-0.1, {}),
    "output_dropout": (2.0, {}),
    "recurrent_dropout": (1.5, {}),
    "weight_dropout": (1.5, {}),
    "recurrent_mask": ("batch", {"strategy": "zaremba"}),
    "zoneout_hidden": (1.0, {}),
    "zoneout_cell": (0.1, {"cell": "gru"}),
    "embedding_dropout": (1.5, {}),
    "activation_reg": (-1.0, {}),
    "temporal_activation_reg": (-1.0, {}),
    "weight_decay": (-1.0, {}),
    "train_tokens": (-1, {}),
    "batch_size": (0, {}),
    "bptt": (0, {}),
    "epochs": (0, {}),
    "lr": (0.0, {}),
    "lr_schedule": ("linear", {}),
    "lr_decay": (-0.5, {}),
    "decay_after": (-1, {}),
    "clip_norm": (0.0, {}),
    "optimizer": ("adam", {}),
    "asgd_nonmono": (0, {}),
    "ema_decay": (1.0, {}),
    "ema_start": (1.0, {}),
    "precision": ("float16", {}),
    "eval_bptt": (0, {}),
    "eval_tokens": (1, {}),
    "valid_batch_size": (0, {}),
    "checkpoint_minutes": (-1.0, {}),
    "checkpoint_steps": (-1, {}),
    "max_train_minutes": (-1.0, {}),
    "log_every": (-1, {}),
}
# Taken as given: any value is a setting (a seed, a device name resolved when the run starts).
UNCHECKED = {"variable_bptt", "seed", "device"}


def test_every_config_field_is_checked_or_deliberately_not():
    names = {field.name for field in dataclasses.fields(Config)}
    assert set(INVALID) | UNCHECKED == names and not set(INVALID) & UNCHECKED


@pytest.mark.parametrize("name", sorted(INVALID))
def test_a_config_error_names_its_field_and_no_flag(name):
    value, beside = INVALID[name]
    with pytest.raises(RnnregError) as refused:
        Config(**beside, **{name: value})
    message = str(refused.value)
    assert re.search(rf"(?<!\w){name}(?!\w)", message), message
    assert name in refused.value.parameters
    assert "--" not in message and "`" not in message, message


def test_the_command_line_words_the_same_error_with_its_flags():
    train = cli._parser().commands["train"]
    with pytest.raises(RnnregError) as refused:
        Config(strategy="none", strategy_p=0.5)
    assert str(refused.value).startswith("strategy_p=0.5 has no effect with strategy='none'")
    assert worded(refused.value, train).startswith(
        "--dropout 0.5 has no effect with --strategy none")
    assert refused.value.parameters == ("strategy_p", "strategy")


@pytest.mark.parametrize("text,python,command_line", [
    ("`hidden_size` must be", "hidden_size must be", "--hidden-size must be"),
    ("`strategy_p=0.5`", "strategy_p=0.5", "--dropout 0.5"),
    ("`optimizer='sgd'`", "optimizer='sgd'", "--optimizer sgd"),
    ("`tie_weights=False`", "tie_weights=False", "--no-tie-weights"),
    ("`resume=True`", "resume=True", "--resume"),
    ("`download=False`", "download=False", "--no-download"),
    ("`data_dir`", "data_dir", "--data-dir"),
    ("`hx` (a layer's argument)", "hx (a layer's argument)", "hx (a layer's argument)"),
    ("run `rnnreg download ptb`", "run `rnnreg download ptb`", "run `rnnreg download ptb`"),
])
def test_parameters_are_worded_for_python_and_for_the_command_line(text, python,
                                                                   command_line):
    """One message: Python names for a Python caller, the command's flags on the command
    line; a name the command has no flag for, and a command in backquotes, stay as written."""
    error = RnnregError(text)
    assert str(error) == python
    assert worded(error, cli._parser().commands["train"]) == command_line


def test_the_user_errors_are_one_family_and_stay_what_they_were():
    for kind, was in ((DataError, ValueError), (RunDirError, RuntimeError),
                      (TrainingDiverged, RuntimeError)):
        assert issubclass(kind, RnnregError) and issubclass(kind, was)
    assert issubclass(RnnregError, ValueError)
    assert flag("strategy_p") == "--dropout" and flag("hidden_size") == "--hidden-size"

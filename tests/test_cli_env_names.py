"""Every option reads the environment variable its flag names, as the README promises.

Given the whole ``deblur`` command tree, when each option's variables are listed, then
``DEBLUR_<COMMAND>_<FLAG>`` is among them (``deblur results --format``:
``DEBLUR_RESULTS_FORMAT``, not click's ``DEBLUR_RESULTS_FMT`` after the Python
parameter), and ``--help`` shows it. Setting it changes what the command does, and the
older name still works.
"""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from producer.cli import main


def _options(group: click.Group, path: list[str], ctx: click.Context) -> list[tuple[list[str], click.Option]]:
    found = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        sub_ctx = click.Context(command, parent=ctx, info_name=name)
        if isinstance(command, click.Group):
            found += _options(command, [*path, name], sub_ctx)
        else:
            found += [([*path, name], p) for p in command.params if isinstance(p, click.Option)]
    return found


def _env_of(path: list[str], flag: str) -> str:
    return "_".join(["DEBLUR", *path, flag]).upper().replace("-", "_")


def test_every_option_reads_the_variable_its_flag_names() -> None:
    ctx = click.Context(main, info_name="deblur")
    options = _options(main, [], ctx)
    assert len(options) > 100  # the whole tree, lazily imported commands included
    wrong = []
    for path, option in options:
        flags = [name for name in option.opts if name.startswith("--")]
        if not flags or not option.allow_from_autoenv:
            continue
        wanted = _env_of(path, flags[0][2:])
        names = [option.envvar] if isinstance(option.envvar, str) else list(option.envvar or [])
        if wanted not in names:
            wrong.append(f"deblur {' '.join(path)} {flags[0]}: {names or 'automatic'}, not {wanted}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("variable", ["DEBLUR_MODELS_LIST_FORMAT", "DEBLUR_MODELS_FORMAT"])
def test_the_flags_variable_and_the_older_name_both_set_the_option(variable: str) -> None:
    result = CliRunner().invoke(main, ["models", "list"], env={variable: "json"})
    assert result.exit_code == 0, result.output
    assert {entry["name"] for entry in json.loads(result.output)} >= {"wiener", "l0-blind"}


def test_help_names_the_flags_variable_first() -> None:
    result = CliRunner().invoke(main, ["results", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "DEBLUR_RESULTS_FORMAT, DEBLUR_RESULTS_FMT" in " ".join(result.output.split())

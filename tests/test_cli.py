"""Every command-line entry point ends alike (sama_core/cli.py): a SamaError is one line "error: ..." and exit
code 2, Ctrl-C is one line saying what happens to the work and exit code 130, neither a traceback.

The failure is injected where each main sets up logging, right after its arguments are parsed, so the test
goes through the real `main` of each module with arguments it accepts."""

import importlib
import logging

import pytest

from sama_core.cli import EXIT_ERROR, EXIT_INTERRUPTED, command_line
from sama_core.errors import SamaInputError

ENTRY_POINTS = {  # module: (argv its parser accepts, the line printed on Ctrl-C)
    "sama_core.__main__": (["info", "dit.safetensors"], "interrupted"),
    "train.__main__": (["stage1", "--config", "stage1.yaml"], "interrupted: resume with --resume latest"),
    "train.vae_train": (["--config", "vae.yaml"], "interrupted: resume with --resume latest"),
    "train.sampled_latents": (["--bundle", "b", "--out", "o"], "interrupted: rerun the same command to resume"),
    "train.eval": (["--data", "heldout"],
                   "interrupted: nothing was written; run the same command again (an evaluation starts over)"),
    "train.shapes": (["status", "--out", "runs/shapes"], "interrupted: run the same command again to continue"),
}


def _raising(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_ctrl_c_is_one_line_and_exit_130(module, monkeypatch, capsys):
    argv, line = ENTRY_POINTS[module]
    monkeypatch.setattr(logging, "basicConfig", _raising(KeyboardInterrupt()))
    assert importlib.import_module(module).main(argv) == EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err
    assert err == line + "\n"


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_an_expected_error_is_one_line_and_exit_2(module, monkeypatch, capsys):
    argv, _ = ENTRY_POINTS[module]
    monkeypatch.setattr(logging, "basicConfig", _raising(SamaInputError("--thing must be positive, got -1")))
    assert importlib.import_module(module).main(argv) == EXIT_ERROR == 2
    assert capsys.readouterr().err == "error: --thing must be positive, got -1\n"


def test_other_exceptions_are_not_hidden():
    """A bug is not an expected problem: it keeps its traceback."""
    @command_line()
    def main(argv=None):
        raise ZeroDivisionError("a bug")
    with pytest.raises(ZeroDivisionError):
        main([])


def test_the_return_value_is_the_exit_code():
    assert command_line()(lambda argv=None: None)() == 0
    assert command_line()(lambda argv=None: 3)([]) == 3

"""What both command lines share: the program name in --help, only meaningful subcommands."""

import importlib

import pytest

OFFERED = {"pretrain": "{fit,validate}", "finetune": "{fit,validate,predict}"}


@pytest.mark.parametrize("stage", sorted(OFFERED))
def test_help_names_the_program_and_its_subcommands(stage, capsys):
    main = importlib.import_module(f"simmim.{stage}").main
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m simmim.{stage} [-c CONFIG] {OFFERED[stage]}")
    with pytest.raises(SystemExit) as done:
        main(["fit", "--help"])  # the fine-tuning default does not go looking for a pretraining export first
    assert done.value.code == 0 and f"python -m simmim.{stage}" in capsys.readouterr().out


@pytest.mark.parametrize("stage", sorted(OFFERED))
def test_a_subcommand_without_meaning_is_refused_in_one_line(stage):
    main = importlib.import_module(f"simmim.{stage}").main
    with pytest.raises(SystemExit, match=rf"^error: python -m simmim.{stage} has no `test` subcommand; it offers fit"):
        main(["test"])

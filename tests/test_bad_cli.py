"""`pockengine train` given bad arguments: a usage error or one line naming the argument, before any data or model
is loaded (each case returns within a second), never a traceback."""

import pytest

from pockengine.cli import main


def run(capsys, *args: str) -> tuple[int, str]:
    try:
        code = main(["train", *args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "loss " not in captured.out  # refused before training
    return code, captured.err


@pytest.mark.parametrize("args,message", [
    (["--steps", "-1"], "argument --steps: must be at least 1, got -1"),
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--steps", "ten"], "argument --steps: 'ten' is not an integer"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--size", "0"], "argument --size: must be at least 1"),
    (["--eval-size", "-5"], "argument --eval-size: must be at least 1"),
    (["--log-every", "0"], "argument --log-every: must be at least 1"),
    (["--threads", "-2"], "argument --threads: must be at least 0"),
    (["--seed", "-1"], "argument --seed: must be at least 0"),
    (["--lr", "-1"], "argument --lr: must be a finite number >= 0, got -1"),
    (["--lr", "nan"], "argument --lr: must be a finite number >= 0, got nan"),
    (["--lr", "inf"], "argument --lr: must be a finite number >= 0, got inf"),
    (["--lr", "fast"], "argument --lr: 'fast' is not a number"),
    (["--scheme", "last:0"], "--scheme last:0: K is the number of last layers to train, at least 1"),
    (["--scheme", "last:-3"], "at least 1"),
    (["--scheme", "last:x"], "write last:K with an integer K"),
    (["--scheme", "nonsense"], "neither a preset (full, bias_only, head, last:K) nor a scheme file"),
])
def test_bad_arguments_are_named(capsys, args, message):
    code, err = run(capsys, *args)
    assert code == 2 and message in err


def test_a_malformed_scheme_file_is_named(capsys, tmp_path):
    (tmp_path / "s.yaml").write_text("rules: [ {modules: '0', mode: full\n")
    code, err = run(capsys, "--scheme", str(tmp_path / "s.yaml"))
    assert code == 2 and f"cannot read the scheme file {tmp_path / 's.yaml'}" in err
    (tmp_path / "t.yaml").write_text("rules:\n  - {modules: 2, mode: full}\n")
    code, err = run(capsys, "--scheme", str(tmp_path / "t.yaml"))
    assert code == 2 and "t.yaml: a rule's 'modules'" in err


def test_a_save_target_that_is_not_a_checkpoint_is_refused_before_training(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    code, err = run(capsys, "--save", str(tmp_path / "notes.txt"))
    assert code == 2 and "notes.txt is a file" in err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    code, err = run(capsys, "--save", str(tmp_path))
    assert code == 2 and "not a pockengine checkpoint" in err

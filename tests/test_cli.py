"""The command line: `pockengine train` (the README's main job) and its errors."""

import pytest

import pockengine as pe
from pockengine.cli import main


@pytest.mark.slow  # the real MobileNetV2 on MNIST
def test_train_runs_steps_and_saves_a_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    code = main(["train", "--steps", "3", "--size", "32", "--batch-size", "4", "--eval-size", "16",
                 "--scheme", "last:2", "--optimizer", "sgd", "--lr", "0.01", "--save", str(ckpt)])
    out = capsys.readouterr().out
    assert code == 0
    assert "scheme last2" in out and "predicted step peak" in out
    assert out.count("loss ") >= 2 and "validation accuracy after 3 steps" in out
    assert (ckpt / "trainer.json").is_file() and (ckpt / "model.safetensors").is_file()
    assert pe.read_checkpoint(ckpt).meta["steps_done"] == 3


@pytest.mark.parametrize("scheme, message", [("last:x", "last:K with an integer"),
                                             ("nowhere.yaml", "does not exist")])
def test_bad_scheme_is_a_clear_error(scheme, message, capsys):
    assert main(["train", "--steps", "1", "--size", "32", "--eval-size", "8", "--scheme", scheme]) == 2
    assert message in capsys.readouterr().err


def test_an_unknown_pass_to_disable_is_a_clear_error(capsys):
    assert main(["train", "--steps", "1", "--disable", "matmull"]) == 2
    err = capsys.readouterr().err
    assert "matmull" in err and "'matmul'" in err


@pytest.mark.parametrize("argv", [["bench"], ["bench", "--quick"], ["bench", "--workload", "minilm", "--help"]])
def test_bench_says_where_the_benchmark_went(argv, capsys):
    """The benchmark lives in the repository (`python -m bench`), not in the installed package."""
    assert main(argv) == 2
    assert "run `python -m bench" in capsys.readouterr().err

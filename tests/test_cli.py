"""The command line: `pockengine train` (the README's main job) and its errors."""

import pytest

import pockengine as pe
from pockengine.cli import main


def test_train_runs_steps_and_saves_a_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    code = main(["train", "--steps", "3", "--size", "32", "--batch-size", "4", "--eval-size", "16",
                 "--scheme", "last:2", "--optimizer", "sgd", "--lr", "0.01", "--save", str(ckpt)])
    out = capsys.readouterr().out
    assert code == 0
    assert "scheme last2" in out and "predicted step peak" in out
    assert out.count("loss ") >= 2 and "validation accuracy after 3 steps" in out
    assert (ckpt / "trainer.json").is_file() and (ckpt / "model.safetensors").is_file()
    assert pe.load(ckpt).meta["steps_done"] == 3


@pytest.mark.parametrize("scheme, message", [("last:x", "last:K with an integer"),
                                             ("nowhere.yaml", "does not exist")])
def test_bad_scheme_is_a_clear_error(scheme, message, capsys):
    assert main(["train", "--steps", "1", "--size", "32", "--eval-size", "8", "--scheme", scheme]) == 2
    assert message in capsys.readouterr().err


def test_bench_refuses_unknown_workloads(capsys):
    assert main(["bench", "--workload", "resnet9000"]) == 2
    assert "unknown workload" in capsys.readouterr().err

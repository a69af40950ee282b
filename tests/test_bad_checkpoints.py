"""Checkpoints under bad conditions: a save killed at every step of its sequence, damaged files, foreign folders,
checkpoints of other models. Nothing is lost, nothing damaged is loaded, every refusal names the file at fault."""

import json
import os
import shutil
import signal

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import pockengine as pe
from pockengine import checkpoint
from pockengine.storage import write_manifest


def mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))


def batch(seed: int = 0, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 6, generator=g),), torch.randint(0, 3, (n,), generator=g)


def trainer(model=None, **kw):
    return pe.compile(model or mlp(), pe.losses.cross_entropy(), batch(), optimizer=pe.optim.AdamW(lr=1e-2), **kw)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def leftovers(folder) -> list[str]:
    """What saves left beside the checkpoint folder (in progress, interrupted, or the one being replaced)."""
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint after one step, written once; tests that damage or edit it work on copies."""
    t = trainer()
    t.step(batch(1))
    folder = tmp_path_factory.mktemp("saved") / "ckpt"
    t.save(folder)
    return folder


@pytest.fixture
def ckpt(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _record_steps(t, folder) -> list[str]:
    steps = []
    checkpoint.after_save_step = steps.append
    try:
        t.save(folder)
    finally:
        checkpoint.after_save_step = lambda step: None
    return steps


def test_a_save_killed_after_any_step_leaves_the_last_complete_checkpoint(tmp_path):
    t = trainer()
    t.step(batch(1))
    pristine = tmp_path / "pristine"
    t.save(pristine)  # one complete checkpoint at steps_done 1
    old = weights(t.model)
    t.step(batch(2))
    new = weights(t.model)
    scratch = tmp_path / "scratch"
    shutil.copytree(pristine, scratch)
    steps = _record_steps(t, scratch)  # the sequence of a save onto an existing checkpoint
    assert steps[-3:] == ["moved aside", "committed", "removed previous"] and len(steps) >= 9
    committed_at = steps.index("committed")

    ckpt = tmp_path / "ckpt"
    for k, step in enumerate(steps):
        for stale in [ckpt, *(tmp_path / name for name in leftovers(ckpt))]:
            shutil.rmtree(stale, ignore_errors=True)
        shutil.copytree(pristine, ckpt)
        pid = os.fork()
        if pid == 0:  # the saving process, killed right after step k
            def die(done: str, target: str = step) -> None:
                if done == target:
                    os.kill(os.getpid(), signal.SIGKILL)
            checkpoint.after_save_step = die
            try:
                t.save(ckpt)
            finally:
                os._exit(3)  # not reached unless the kill failed
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"after {step}: {status}"

        loaded = pe.read_checkpoint(ckpt)
        want_steps, want = (2, new) if k >= committed_at else (1, old)
        assert loaded.meta["steps_done"] == want_steps, f"killed after {step}"
        assert all(torch.equal(loaded.weights[n], want[n]) for n in want), f"killed after {step}"
        assert leftovers(ckpt) == [], f"the load did not clean up after a kill after {step}"
        t.save(ckpt)  # the next save works and leaves one version, no temporary
        assert leftovers(ckpt) == [] and pe.read_checkpoint(ckpt).meta["steps_done"] == 2


def test_the_next_save_removes_what_a_killed_save_left(tmp_path):
    t = trainer()
    t.save(tmp_path / "ckpt")
    pid = os.fork()
    if pid == 0:
        checkpoint.after_save_step = lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == "optimizer" else None
        try:
            t.save(tmp_path / "ckpt")
        finally:
            os._exit(3)
    os.waitpid(pid, 0)
    assert len(leftovers(tmp_path / "ckpt")) == 1  # the killed save's temporary, full of tensors
    t.save(tmp_path / "ckpt")
    assert leftovers(tmp_path / "ckpt") == []


def test_a_first_save_killed_leaves_no_checkpoint_and_nothing_behind(tmp_path):
    t = trainer()
    ckpt = tmp_path / "ckpt"
    pid = os.fork()
    if pid == 0:
        checkpoint.after_save_step = lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == "manifest" else None
        try:
            t.save(ckpt)
        finally:
            os._exit(3)
    os.waitpid(pid, 0)
    assert len(leftovers(ckpt)) == 1
    with pytest.raises(pe.CheckpointError, match="no checkpoint at .*ckpt.*interrupted before it completed"):
        pe.read_checkpoint(ckpt)
    assert leftovers(ckpt) == []  # the load removed the dead save's folder
    t.save(ckpt)
    assert leftovers(ckpt) == [] and pe.read_checkpoint(ckpt).meta["steps_done"] == 0


def test_save_never_replaces_what_is_not_a_checkpoint(tmp_path):
    t = trainer()
    run = tmp_path / "run1"
    run.mkdir()
    (run / "notes.txt").write_text("my notes")
    with pytest.raises(pe.CheckpointError, match="run1.*not a pockengine checkpoint"):
        t.save(run)
    assert (run / "notes.txt").read_text() == "my notes"
    file = tmp_path / "model.bin"
    file.write_bytes(b"precious")
    with pytest.raises(pe.CheckpointError, match="model.bin is a file"):
        t.save(file)
    assert file.read_bytes() == b"precious"


def test_a_checkpoint_folder_holding_other_files_is_not_replaced(tmp_path):
    t = trainer()
    t.save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "notes.txt").write_text("lr sweep 3")
    t.step(batch(1))
    with pytest.raises(pe.CheckpointError, match=r"holds files that pockengine did not write \(\['notes.txt'\]\)"):
        t.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "lr sweep 3"
    assert pe.read_checkpoint(tmp_path / "ckpt").meta["steps_done"] == 0


def test_save_where_no_folder_can_be_made_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(pe.CheckpointError, match="cannot write the checkpoint .*afile"):
        trainer().save(tmp_path / "afile" / "ckpt")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_save_into_a_read_only_folder_is_a_clear_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(pe.CheckpointError, match="cannot write the checkpoint .*locked"):
            trainer().save(locked / "ckpt")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.safetensors", "generator.safetensors",
                                  "trainer.json"])
@pytest.mark.parametrize("damage", ["truncate", "zero 64 bytes", "flip one byte"])
def test_damaged_files_are_refused_naming_them(ckpt, file, damage):
    path = ckpt / file
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "zero 64 bytes":
        start = len(data) // 2 - 32
        data[start:start + 64] = bytes(64)
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    for call in (lambda: pe.read_checkpoint(ckpt), lambda: pe.load(ckpt, mlp(), pe.losses.cross_entropy(), batch())):
        with pytest.raises(pe.CheckpointError, match=f"damaged.*{file}"):
            call()


def _edit(ckpt, change) -> None:
    """Change the checkpoint's files and record them in the manifest, as a hand edit that kept it consistent."""
    folder = ckpt
    change(folder)
    (folder / "pockengine-manifest.json").unlink()
    write_manifest(folder)


def _edit_json(key_change):
    def change(folder):
        meta = json.loads((folder / "trainer.json").read_text())
        key_change(meta)
        (folder / "trainer.json").write_text(json.dumps(meta))
    return change


@pytest.mark.parametrize("change,match", [
    (_edit_json(lambda m: m.pop("selections")), "'selections' is missing"),
    (_edit_json(lambda m: m.update(steps_done="ten")), "'steps_done' is missing or not a int"),
    (_edit_json(lambda m: m.update(steps_done=-3)), "steps_done is -3"),
    (_edit_json(lambda m: m.update(version=1)), "v1; this pockengine reads"),
    (_edit_json(lambda m: m.update(optimizer={"kind": "Adagrad"})), "trainer.json.*kind"),
    (_edit_json(lambda m: m.update(optimizer={"kind": "SGD", "lr": float("-1")})), "lr must be"),
    (_edit_json(lambda m: m["selections"].update({"0.weight": {"kind": "partial", "dim": 0, "channels": [99]}})),
     "selection of 0.weight.*does not fit"),
    (_edit_json(lambda m: m["selections"].update({"0.weight": {"kind": "sideways"}})), "a selection is"),
])
def test_edited_trainer_json_is_refused_clearly(ckpt, change, match):
    _edit(ckpt, change)
    with pytest.raises(pe.PockEngineError, match=match):
        pe.load(ckpt, mlp(), pe.losses.cross_entropy(), batch())


def test_a_selection_without_optimizer_state_is_refused_naming_it(ckpt):

    def drop_state(folder):
        state = load_file(folder / "optimizer.safetensors")
        del state["3.bias::exp_avg"]
        save_file(state, folder / "optimizer.safetensors")
    _edit(ckpt, drop_state)
    with pytest.raises(pe.CheckpointError, match=r"optimizer.safetensors has no optimizer state \['exp_avg'\] for 3.bias"):
        pe.load(ckpt, mlp(), pe.losses.cross_entropy(), batch())


@pytest.mark.parametrize("make,match", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text("{}"), "is a file"),
    (lambda p: p.mkdir(), "is not a pockengine checkpoint"),
    (lambda p: (p.mkdir(), (p / "trainer.json").write_text('{"format": "pockengine-checkpoint", "version": 1}')),
     "trainer.json holds format pockengine-checkpoint v1; this pockengine reads pockengine-checkpoint v2"),
])
def test_what_is_not_a_checkpoint_is_refused(tmp_path, make, match):
    make(tmp_path / "ckpt")
    with pytest.raises(pe.CheckpointError, match=match):
        pe.read_checkpoint(tmp_path / "ckpt")


def test_checkpoints_of_other_models_are_refused_naming_the_parameters(ckpt, tmp_path):
    wider = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.0), nn.Linear(32, 3))
    with pytest.raises(pe.CheckpointError, match=r"0.weight: torch.float32 \[16, 6\] saved, torch.float32 \[32, 6\]"):
        pe.load(tmp_path / "ckpt", wider, pe.losses.cross_entropy(), batch())
    other = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(pe.CheckpointError, match=r"does not fit this model: missing \[\], unexpected \['3.bias'"):
        pe.load(tmp_path / "ckpt", other, pe.losses.cross_entropy(), batch())
    with pytest.raises(pe.CheckpointError, match="dtype"):
        pe.load(tmp_path / "ckpt", mlp().double(), pe.losses.cross_entropy(), batch())


def test_resuming_with_dropout_is_reproducible(tmp_path):
    t = trainer(mlp(dropout=0.5), seed=7)
    t.step(batch(1))
    t.save(tmp_path / "ckpt")
    expected = [t.step(batch(s)) for s in (2, 3, 4)]
    resumed = pe.load(tmp_path / "ckpt", mlp(dropout=0.5), pe.losses.cross_entropy(), batch())
    assert [resumed.step(batch(s)) for s in (2, 3, 4)] == expected  # bit-identical: same draws, same arithmetic
    fresh = pe.load(tmp_path / "ckpt", mlp(dropout=0.5), pe.losses.cross_entropy(), batch())
    fresh.generator.manual_seed(8)
    assert [fresh.step(batch(s)) for s in (2, 3, 4)] != expected  # dropout matters here: the test can fail


def test_an_error_seen_in_another_file_still_names_the_damaged_one(ckpt):
    # A changed parameter name in trainer.json shows as optimizer state missing for a parameter that does not exist.
    meta = ckpt / "trainer.json"
    meta.write_text(meta.read_text().replace('"3.bias"', '"3.bi s"'))
    with pytest.raises(pe.CheckpointError, match=r"no optimizer state .* for 3.bi s.*trainer.json does not match its"):
        pe.read_checkpoint(ckpt)


def test_written_files_get_the_usual_permissions(tmp_path):
    """safetensors' writer and mkstemp create files only their owner can read; what pockengine writes for the user
    (checkpoints, single weight files) is readable as the user's other files are (umask)."""
    import stat

    from pockengine.storage import USUAL_FILE_MODE, save_safetensors

    save_safetensors({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")
    trainer().save(tmp_path / "checkpoint")
    files = [tmp_path / "weights.safetensors", *(tmp_path / "checkpoint").iterdir()]
    assert len(files) > 4
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {USUAL_FILE_MODE}

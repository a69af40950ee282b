"""pockengine as users get it: `python -m pockengine` is the `pockengine` command, and `pip install .` gives a
package that works outside the repository.

The install test builds the wheel from a copy of the package's sources (pyproject.toml, README.md, pockengine/),
installs it with `pip install --no-deps --no-index` into a fresh virtual environment outside the repository, and
runs from a directory outside it: the import, the console script, and a small version of the README's example (which
compiles the native kernels from the installed pockengine/kernels/masks.c). torch and the other dependencies come from
the environment running the tests (a .pth line in the fresh environment: nothing is downloaded); PYTHONPATH is
cleared, so the repository's checkout cannot stand in for the installed package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_python_m_pockengine_is_the_pockengine_command():
    run = subprocess.run([sys.executable, "-m", "pockengine", "--help"], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: pockengine ") and "train" in run.stdout and "bench" in run.stdout


EXAMPLE = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch
    from torch import nn

    import pockengine as pe

    assert Path(pe.__file__).is_relative_to(Path(sys.prefix)), pe.__file__  # the installed copy
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    batch = ((torch.randn(4, 3, 8, 8),), torch.randint(0, 4, (4,)))
    loss_fn = pe.losses.cross_entropy()
    trainer = pe.compile(model, loss_fn, batch, optimizer=pe.optim.SGD(lr=0.1, momentum=0.9),
                         scheme=pe.Scheme.bias_only(), freeze_batchnorm=True)
    losses = [trainer.step(batch) for _ in range(3)]
    assert losses[2] < losses[0], losses
    assert set(trainer.gradients(batch)) == {"0.bias", "1.bias", "4.bias"}
    print(trainer.summary())
    print(trainer.memory_plan().table())
    trainer.save("ckpt")
    resumed = pe.load("ckpt", model, loss_fn, batch)
    expected = trainer.gradients(batch)
    assert all(torch.equal(g, expected[name]) for name, g in resumed.gradients(batch).items())
    print("EXAMPLE OK", losses)
""")


@pytest.mark.slow
def test_pip_install_gives_a_package_that_works_outside_the_repository(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copy(REPO / "README.md", source)
    shutil.copytree(REPO / "pockengine", source / "pockengine", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(wheels), str(source)], check=True, timeout=300)
    (wheel,) = wheels.glob("pockengine-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pockengine/kernels/masks.c" in names and "pockengine/__main__.py" in names
    assert not [n for n in names if n.startswith(("bench/", "tests/"))], "the benchmark or tests are in the wheel"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "test-dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, timeout=300)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["POCKENGINE_CACHE"] = str(tmp_path / "cache")  # the native kernels build here, from the installed source
    run = subprocess.run([str(python), "-c", EXAMPLE], cwd=work, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "EXAMPLE OK" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    assert list((tmp_path / "cache" / "kernels").glob("masks-*.so")), "no native kernels built from the wheel's masks.c"
    command = subprocess.run([str(venv / "bin" / "pockengine"), "bench"], cwd=work, env=env, capture_output=True,
                             text=True, timeout=300)
    assert command.returncode == 2 and "python -m bench" in command.stderr, command.stderr[-3000:]

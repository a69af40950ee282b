"""The compile-time benchmark (`python -m bench.compile_time`) on a toy model: each system in its own process, the
warm pockengine run reading the entry the cold one wrote, and the report written."""

import json
import os

import pytest

from bench import compile_time


def test_cold_and_warm_runs_on_a_toy_model(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("POCKENGINE_CAPTURE_CACHE", "1")
    assert compile_time.main(["--models", "toy", "--systems", "pockengine-cold,pockengine-warm", "--repeats", "1",
                              "--out", str(tmp_path / "out")]) == 0
    records = json.loads((tmp_path / "out" / "results.json").read_text())["records"]
    cold, warm = (r for r in records if r["system"] in ("pockengine-cold", "pockengine-warm"))
    assert cold["cacheable"] and not cold["entry_before"] and cold["tracer_imported"]
    assert warm["entry_before"] and not warm["tracer_imported"]  # read from the cache: torch.export never loaded
    assert cold["loss"] == warm["loss"]
    assert all(r["setup_s"] == pytest.approx(r["compile_s"] + r["first_step_s"]) for r in records)
    text = (tmp_path / "out" / "README.md").read_text()
    assert "| toy | pockengine-warm |" in text and "python -m bench.compile_time --models toy" in text
    assert os.listdir(tmp_path / "cache" / "capture")
    (tmp_path / "out" / "README.md").unlink()
    assert compile_time.main(["--report", "--out", str(tmp_path / "out")]) == 0  # the report again, from the results
    assert (tmp_path / "out" / "README.md").read_text() == text

"""The demo, shortened: served over real HTTP, the adapting model ends ahead of the frozen one."""

from __future__ import annotations

from rich.console import Console
from typer.testing import CliRunner

from service.cli import app
from service.demo import run_demo


def test_demo_shows_the_adapting_model_ahead_of_the_frozen_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TTA_CACHE_DIR", str(tmp_path))
    console = Console(file=(tmp_path / "out.txt").open("w"), width=120)
    result = run_demo(("clean", "frost", "contrast"), per_segment=96, batch=32, console=console)
    assert [s.name for s in result.segments] == ["clean", "frost", "contrast"]
    assert result.images == 3 * 96
    assert result.adapting_accuracy > result.frozen_accuracy + 10
    assert result.segments[0].frozen_accuracy > 90  # clean digits: both models are good
    assert result.adaptation["samples_selected"] > 0
    console.file.close()
    text = (tmp_path / "out.txt").read_text()
    assert "adaptation is ahead of the frozen model" in text


def test_demo_refuses_unknown_segments():
    result = CliRunner().invoke(app, ["demo", "--segments", "clean,smoke"])
    assert result.exit_code == 2
    assert "unknown segments ['smoke']" in result.output

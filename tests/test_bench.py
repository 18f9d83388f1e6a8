"""The benchmark runner and ``tta-serve bench``: JSON contract, data paths, options, errors.

Small on purpose (a few hundred images, a subset of corruptions, Fisher from 200 images) so the
whole file runs in well under two minutes on two CPU cores; corrupted sets are cached per module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from adapters.corruptions import CORRUPTIONS, corrupt_dataset
from adapters.datasets import to_tensor
from benchmarks import mixed, report, runner
from benchmarks.cli import parse_set_options, parse_value
from benchmarks.data import cifar10_test_path
from service.cli import app

RUN_KEYS = {
    "method": str,
    "protocol": str,
    "mean_error": float,
    "errors": dict,
    "ece": float,
    "backward_samples": int,
    "samples": int,
    "clean_accuracy_after": float,
    "images_per_second": float,
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


def _config(weights: Path, cache: Path, **kwargs) -> runner.BenchConfig:
    defaults = {"limit": 100, "batch_size": 50, "fisher_size": 200, "forward_batches": 1}
    return runner.BenchConfig(
        clean_data=cifar10_test_path(), weights=weights, cache_dir=cache, **{**defaults, **kwargs}
    )


def _invoke(*args: str):
    return CliRunner().invoke(app, ["bench", *args])


# --------------------------------------------------------------------------- the CLI contract
def test_bench_cli_writes_the_json_contract(cifar10, resnet20_weights, cache, tmp_path):
    out = tmp_path / "bench.json"
    corruptions = ["gaussian_noise", "contrast"]
    result = _invoke(
        "--weights",
        str(resnet20_weights),
        "--clean-data",
        str(cifar10_test_path()),
        "--limit",
        "100",
        "--batch-size",
        "50",
        "--forward-batches",
        "1",
        "--corruptions",
        ",".join(corruptions),
        "--fisher-size",
        "200",
        "--cache-dir",
        str(cache),
        "--set",
        "eata.lr=0.002",
        "--set",
        "eata-c.betas=[0.9, 0.99]",
        "--json",
        str(out),
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["runs"]] == ["source", "norm", "tent", "eata", "eata-c"]
    for run in data["runs"]:
        for key, kind in RUN_KEYS.items():
            assert isinstance(run[key], kind), (run["method"], key)
        assert run["protocol"] == "continual"
        assert list(run["errors"]) == corruptions  # spec order
        assert run["samples"] == 200
        for rate in (run["mean_error"], run["ece"], run["clean_accuracy_after"], *run["errors"].values()):
            assert 0.0 <= rate <= 100.0
        assert run["mean_error"] == pytest.approx(np.mean(list(run["errors"].values())))
        assert 0 <= run["backward_samples"] <= run["samples"]
        assert run["images_per_second"] > 0
    by_method = {r["method"]: r for r in data["runs"]}
    assert by_method["source"]["backward_samples"] == by_method["norm"]["backward_samples"] == 0
    assert by_method["tent"]["backward_samples"] == 200
    assert 0 < by_method["eata"]["backward_samples"] < 200  # EATA skips unreliable/redundant samples
    # Source: frozen, so its clean accuracy after the stream is the source accuracy; norm beats it on noise.
    cfg = data["config"]
    assert by_method["source"]["clean_accuracy_after"] == cfg["source_clean_accuracy"] > 80
    assert by_method["norm"]["errors"]["gaussian_noise"] < by_method["source"]["errors"]["gaussian_noise"]
    # Every effective option of every method, overrides included.
    eata = cfg["methods"]["eata"]
    assert eata["options"]["lr"] == 0.002
    assert eata["options"]["optimizer"] == "adam" and eata["options"]["fisher_alpha"] == 1.0
    assert "e0" in eata["options"] and eata["e0"] == pytest.approx(0.4 * math.log(10))
    assert eata["redundancy_eps"] == pytest.approx(0.4)
    assert cfg["methods"]["eata-c"]["options"]["betas"] == [0.9, 0.99]
    assert cfg["methods"]["eata-c"]["options"]["drop_prob"] == 0.005
    assert cfg["methods"]["tent"]["options"]["lr"] == 0.001
    assert set(cfg["methods"]) == {"source", "norm", "tent", "eata", "eata-c"}
    assert cfg["fisher"]["samples"] == 200 and cfg["forward_only"]["images_per_second"] > 0
    assert (cfg["severity"], cfg["batch_size"], cfg["limit"], cfg["seed"]) == (5, 50, 100, 0)
    assert cfg["partial"] is False
    # The tables: one per method plus the "forward only" reference row.
    for method in by_method:
        assert f"### {method} (continual)" in result.stdout
    assert "| forward only" in result.stdout


def test_parse_set_values():
    assert parse_value("0.001") == 0.001 and parse_value("1e-3") == 0.001 and parse_value(".5") == 0.5
    assert parse_value("3") == 3 and parse_value("true") is True and parse_value("False") is False
    assert parse_value("[0.9,0.999]") == [0.9, 0.999] and parse_value("adam") == "adam"
    assert parse_value("null") is None
    parsed = parse_set_options(["eata.lr=0.001", "eata.optimizer=adam", "eata-c.guard.enabled=true"])
    assert parsed == {"eata": {"lr": 0.001, "optimizer": "adam"}, "eata-c": {"guard": {"enabled": True}}}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "eata.nope=1"], "nope"),
        (["--set", "eata.lr=-1"], "greater than 0"),
        (["--set", "eata=1"], "METHOD.OPTION=VALUE"),
        (["--set", "nomethod.lr=1"], "unknown adaptation method"),
        (["--methods", "source,bogus"], "bogus"),
        (["--corruptions", "fog,rain"], "rain"),
        (["--protocol", "sometimes"], "sometimes"),
        (["--model", "resnet99"], "resnet99"),
        (["--order", "sorted"], "sorted"),
        (["--dirichlet", "0"], "--dirichlet"),
        (["--order", "correlated", "--dirichlet", "0.1"], "not both"),
        (["--protocol", "mixed", "--severity", "3"], "drop --severity"),
        (["--protocol", "mixed", "--cifar10c-dir", "."], "corrupts on the fly"),
        (["--protocol", "mixed", "--limit", "20000"], "20000"),
    ],
)
def test_bad_arguments_fail_clearly(args, expected, cifar10, resnet20_weights, tmp_path):
    result = _invoke("--weights", str(resnet20_weights), "--cache-dir", str(tmp_path), "--quiet", *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output


def test_missing_files_fail_clearly(cifar10, resnet20_weights, tmp_path):
    base = ["--weights", str(resnet20_weights), "--cache-dir", str(tmp_path), "--quiet", "--limit", "10"]
    result = _invoke(*base, "--clean-data", str(tmp_path / "absent.npz"))
    assert result.exit_code == 2 and "absent.npz" in result.output
    result = _invoke(*base[2:], "--weights", str(tmp_path / "absent.th"))
    assert result.exit_code == 2 and "absent.th" in result.output
    (tmp_path / "c10c").mkdir()
    np.save(tmp_path / "c10c" / "labels.npy", np.zeros(10, dtype=np.int64))
    result = _invoke(*base, "--cifar10c-dir", str(tmp_path / "c10c"), "--corruptions", "fog")
    assert result.exit_code == 2 and "fog.npy" in result.output


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, cifar10, resnet20_weights, tmp_path):
    monkeypatch.setattr(report.importlib.util, "find_spec", lambda name: None)
    result = _invoke("--weights", str(resnet20_weights), "--plot", str(tmp_path / "p.png"), "--quiet")
    assert result.exit_code == 2
    assert "pip install 'tta-serve[bench]'" in result.output


# --------------------------------------------------------------------------- the two data paths
def _write_cifar10c(directory: Path, blocks: dict[str, np.ndarray], labels: np.ndarray) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, images in blocks.items():
        np.save(directory / f"{name}.npy", images)
    np.save(directory / "labels.npy", labels)
    return directory


def _numbers(result: runner.BenchResult) -> list[tuple]:
    return [(r.method, r.errors, r.eces, r.backward_samples, r.clean_accuracy_after) for r in result.runs]


def test_cifar10c_dir_matches_on_the_fly(cifar10, resnet20_weights, cache, tmp_path):
    """Single-severity files (row count != 5 x 10,000) built from the generator give identical numbers."""
    x, y = cifar10
    names = ("gaussian_noise", "contrast")
    rows = 120  # more rows than --limit: both paths must take the same first 80
    blocks = {n: corrupt_dataset(x[:rows], n, 5, seed=0, cache_dir=cache) for n in names}
    directory = _write_cifar10c(tmp_path / "c10c", blocks, y[:rows])
    options = {"methods": ("norm", "eata"), "corruptions": names, "limit": 80, "batch_size": 40}
    on_the_fly = runner.run_benchmark(_config(resnet20_weights, cache, **options))
    from_dir = runner.run_benchmark(_config(resnet20_weights, cache, cifar10c_dir=directory, **options))
    assert _numbers(on_the_fly) == _numbers(from_dir)
    assert from_dir.config["data"] == "cifar10c_dir" and on_the_fly.config["data"] == "on_the_fly"
    assert from_dir.config["samples_per_corruption"] == {n: 80 for n in names}


def test_cifar10c_five_block_rule(tmp_path):
    """A file of exactly 5 x severity_rows rows holds severities 1-5 in blocks; other sizes are one severity."""
    block = 4
    images = np.repeat(np.arange(1, 6, dtype=np.uint8), block)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    labels = np.arange(5 * block)
    directory = _write_cifar10c(tmp_path / "five", {"fog": images}, labels)
    for severity in range(1, 6):
        x, y = runner.load_cifar10c(directory, "fog", severity, severity_rows=block)
        assert (x == severity).all() and x.shape[0] == block
        assert y.tolist() == list(range((severity - 1) * block, severity * block))
    x, y = runner.load_cifar10c(directory, "fog", 3, limit=2, severity_rows=block)
    assert (x == 3).all() and y.tolist() == [2 * block, 2 * block + 1]
    # Labels of one block only (not 5x) are used as they are.
    np.save(directory / "labels.npy", np.arange(block) + 100)
    _, y = runner.load_cifar10c(directory, "fog", 2, severity_rows=block)
    assert y.tolist() == [100, 101, 102, 103]
    # Any other row count: the whole file is the requested severity.
    np.save(directory / "labels.npy", labels)
    x, y = runner.load_cifar10c(directory, "fog", 2, severity_rows=block + 1)
    assert x.shape[0] == 5 * block and y.tolist() == labels.tolist()
    np.save(directory / "labels.npy", np.arange(7))
    with pytest.raises(runner.BenchError, match=r"labels\.npy"):
        runner.load_cifar10c(directory, "fog", 2, severity_rows=block)


def test_five_block_file_matches_on_the_fly(cifar10, resnet20_weights, cache, tmp_path):
    """The 5-block layout end to end, with a small block size standing in for 10,000."""
    x, y = cifar10
    rows = 60
    stacked = np.concatenate([corrupt_dataset(x[:rows], "fog", s, seed=0, cache_dir=cache) for s in range(1, 6)])
    directory = _write_cifar10c(tmp_path / "c10c", {"fog": stacked}, np.tile(y[:rows], 5))
    options = {"methods": ("norm",), "corruptions": ("fog",), "severity": 3, "limit": rows}
    on_the_fly = runner.run_benchmark(_config(resnet20_weights, cache, **options))
    from_dir = runner.run_benchmark(
        _config(resnet20_weights, cache, cifar10c_dir=directory, cifar10c_severity_rows=rows, **options)
    )
    assert _numbers(on_the_fly) == _numbers(from_dir)


# --------------------------------------------------------------------------- stream orders
def test_correlated_orders_hurt_batch_statistics_but_not_the_frozen_model(cifar10, resnet20_weights, cache):
    """Same images in another order: source scores the same, BN-adapt on one-class batches much worse."""
    common = {"methods": ("source", "norm"), "corruptions": ("gaussian_noise",), "limit": 200, "batch_size": 50}
    runs = {
        order: runner.run_benchmark(_config(resnet20_weights, cache, order=order, dirichlet_alpha=alpha, **common))
        for order, alpha in [("shuffled", None), ("correlated", None), ("dirichlet", 0.1)]
    }
    errors = {order: {run.method: run.mean_error for run in result.runs} for order, result in runs.items()}
    assert errors["shuffled"]["source"] == errors["correlated"]["source"] == errors["dirichlet"]["source"]
    assert errors["correlated"]["norm"] > errors["shuffled"]["norm"] + 20
    assert errors["dirichlet"]["norm"] > errors["shuffled"]["norm"] + 5
    assert runs["dirichlet"].config["order"] == "dirichlet" and runs["dirichlet"].config["dirichlet_alpha"] == 0.1
    assert runs["correlated"].config["dirichlet_alpha"] is None
    assert "correlated" in report.format_report(runs["correlated"])


# --------------------------------------------------------------------------- reproducibility
def test_seeded_runs_do_not_depend_on_method_or_corruption_order(cifar10, resnet20_weights, cache):
    """Reset protocol + per-method seeding: eata-c on contrast gives the same numbers alone or after others."""
    snapshots: list[runner.BenchResult] = []
    both = runner.run_benchmark(
        on_run=snapshots.append,
        config=_config(
            resnet20_weights,
            cache,
            methods=("tent", "eata-c"),
            corruptions=("gaussian_noise", "contrast"),
            protocol="reset",
            limit=40,
            batch_size=20,
        ),
    )
    alone = runner.run_benchmark(
        _config(
            resnet20_weights,
            cache,
            methods=("eata-c",),
            corruptions=("contrast",),
            protocol="reset",
            limit=40,
            batch_size=20,
        )
    )
    run_both, run_alone = both.runs[1], alone.runs[0]
    # The partial result after the first method is kept (written to --json by the CLI).
    assert len(snapshots) == 1 and snapshots[0].config["partial"] and snapshots[0].runs == both.runs[:1]
    assert run_both.errors["contrast"] == run_alone.errors["contrast"]
    assert run_both.eces["contrast"] == run_alone.eces["contrast"]
    assert both.runs[0].protocol == "reset"


def test_report_renders_from_json(tmp_path):
    """Tables and the plot can be redrawn from a saved JSON (no model needed)."""
    names = list(CORRUPTIONS[:3])
    run = runner.RunResult(
        method="eata",
        protocol="continual",
        mean_error=20.0,
        errors=dict.fromkeys(names, 20.0),
        ece=10.0,
        backward_samples=5,
        samples=30,
        clean_accuracy_after=90.0,
        images_per_second=100.0,
        seconds=0.3,
        eces=dict.fromkeys(names, 10.0),
        ece_pooled=10.0,
        forgetting=-1.0,
        resets={},
    )
    config = {
        "model": "resnet20",
        "severity": 5,
        "protocol": "continual",
        "batch_size": 10,
        "seed": 0,
        "corruptions": names,
        "samples_per_corruption": dict.fromkeys(names, 10),
        "source_clean_accuracy": 91.0,
        "forward_only": {"images_per_second": 500.0},
        "wall_seconds": 1.0,
        "threads": 1,
    }
    path = tmp_path / "r.json"
    report.write_json(runner.BenchResult([run], config), path)
    again = runner.BenchResult.from_json(report.load_json(path))
    text = report.format_report(again)
    assert "### eata (continual)" in text and "| forward only" in text and "5 of 30" in text
    pytest.importorskip("matplotlib")
    report.plot_errors(again, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


# --------------------------------------------------------------------------- the mixed protocol
def test_mixed_schedule_rises_and_falls_between_clean_segments():
    segments = mixed.schedule(["gaussian_noise", "fog"])
    assert [s.label for s in segments[:11]] == [
        "clean:start",
        *(f"gaussian_noise:{k}:up" for k in (1, 2, 3, 4)),
        "gaussian_noise:5",
        *(f"gaussian_noise:{k}:down" for k in (4, 3, 2, 1)),
        "fog:1:up",
    ]
    assert segments[-1].label == "clean:end" and len(segments) == 2 + 2 * 9
    assert [s.severity for s in segments[10:19]] == [1, 2, 3, 4, 5, 4, 3, 2, 1]
    assert [s.kind for s in segments[:6]] == ["clean", "sev 1-3", "sev 1-3", "sev 1-3", "sev 4-5", "sev 4-5"]
    # The nine segments of a corruption are different images; both clean segments are the same ones.
    windows = [set(mixed.segment_images(s, 1000, 10_000)) for s in segments[1:10]]
    assert all(not a & b for i, a in enumerate(windows) for b in windows[i + 1 :])
    np.testing.assert_array_equal(
        mixed.segment_images(segments[0], 1000, 10_000), mixed.segment_images(segments[-1], 1000, 10_000)
    )


def test_mixed_protocol_end_to_end(cifar10, resnet20_weights, cache, tmp_path):
    """Tiny mixed run through the CLI: segments in order, per-kind columns, JSON, reliability plot."""
    pytest.importorskip("matplotlib")
    out, diagram, plot = tmp_path / "mixed.json", tmp_path / "reliability.png", tmp_path / "segments.png"
    args = ["--weights", str(resnet20_weights), "--clean-data", str(cifar10_test_path()), "--cache-dir", str(cache)]
    args += ["--protocol", "mixed", "--methods", "source,norm", "--corruptions", "gaussian_noise", "--limit", "20"]
    args += ["--batch-size", "10", "--forward-batches", "1", "--json", str(out), "--reliability", str(diagram)]
    result = _invoke(*args, "--plot", str(plot), "--quiet")
    assert result.exit_code == 0, result.output
    for column in ("clean error %", "clean ECE %", "sev 1-3 error %", "sev 1-3 ECE %", "sev 4-5 error %"):
        assert column in result.stdout
    assert "| gaussian_noise:4:down |" in result.stdout
    data = json.loads(out.read_text())
    labels = [s["label"] for s in data["config"]["segments"]]
    assert labels == [s.label for s in mixed.schedule(["gaussian_noise"])]
    assert data["config"]["severity"] is None and data["config"]["mixed_profile"] == [1, 2, 3, 4, 5, 4, 3, 2, 1]
    source, norm = data["runs"]
    assert list(source["errors"]) == labels and source["samples"] == 11 * 20
    assert {k: v["samples"] for k, v in source["kinds"].items()} == {"clean": 40, "sev 1-3": 120, "sev 4-5": 60}
    # The frozen model: both clean segments are the same images, and severe noise hurts it most.
    assert source["errors"]["clean:start"] == source["errors"]["clean:end"]
    assert source["kinds"]["sev 4-5"]["error"] > source["kinds"]["sev 1-3"]["error"] > source["kinds"]["clean"]["error"]
    assert norm["kinds"]["sev 4-5"]["error"] < source["kinds"]["sev 4-5"]["error"]
    assert sum(source["kinds"]["clean"]["bins"]["count"]) == 40
    assert diagram.stat().st_size > 1000 and plot.stat().st_size > 1000


def test_mixed_protocol_takes_the_correlated_orders(cifar10, resnet20_weights, cache):
    """--order correlated sorts the images inside every segment, so norm's batches hold few classes."""
    seen: list[str] = []
    options = {"methods": ("norm",), "corruptions": ("fog",), "protocol": "mixed", "limit": 40, "batch_size": 8}
    result = runner.run_benchmark(
        _config(resnet20_weights, cache, order="correlated", **options),
        progress_hook=lambda method, name, count: seen.append(name),
    )
    shuffled = runner.run_benchmark(_config(resnet20_weights, cache, **options))
    assert result.config["order"] == "correlated"
    assert list(dict.fromkeys(seen)) == [s["label"] for s in result.config["segments"]]
    # Norm normalises with each batch's statistics: single-class batches wreck it on clean images too.
    assert result.runs[0].kinds["clean"]["error"] > shuffled.runs[0].kinds["clean"]["error"] + 10


def test_eata_c_gets_a_confidence_map_fitted_by_the_bench_on_held_out_clean_images(cifar10, resnet20_weights, cache):
    """EATA-C's default confidence ('auto') with no map given: the bench fits one (last 2,000 clean images)."""
    import adapters

    result = runner.run_benchmark(_config(resnet20_weights, cache, methods=("eata-c",), corruptions=("fog",)))
    used = result.config["methods"]["eata-c"]["options"]
    assert used["confidence"] == "auto" and result.config["overrides"]["eata-c"]["confidence_map"] == used[
        "confidence_map"]
    x, y = runner.load_clean(cifar10_test_path())
    model = runner.load_model("resnet20", resnet20_weights)
    logits = adapters.pre_adaptation_logits(model, to_tensor(x[-2000:]), 50)
    fitted = adapters.fit_confidence_map(logits, torch.as_tensor(y[-2000:]))
    assert used["confidence_map"] == pytest.approx(list(fitted))


def test_calibration_sweep_names_its_data_and_its_variants():
    """The sweep tunes on the validation corruptions by default, and no variant leans on a default."""
    from adapters.corruptions import CORRUPTIONS, VALIDATION_CORRUPTIONS
    from benchmarks import sweep

    assert sweep.corruption_names(sweep.DEFAULT_CORRUPTIONS["calibration"]) == VALIDATION_CORRUPTIONS
    assert "spatter" in VALIDATION_CORRUPTIONS
    assert sweep.corruption_names("reported") == CORRUPTIONS
    assert sweep.corruption_names("fog, snow") == ("fog", "snow")
    for label, method, options in sweep.SWEEPS["calibration"]:
        if method == "eata-c":
            assert {"subnetwork", "drop_prob", "confidence"} <= set(options), label
            if options["confidence"] == "subnetwork":
                assert "confidence_samples" in options, label

"""What a new user meets: data named (never guessed), the official CIFAR-10 files, configuration mistakes.

The installed wheel itself is exercised by ``.ci/installed_package`` (a fresh venv outside the
checkout, no shared folder); these tests pin the behaviour behind it.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from adapters.datasets import DataFileError, load_images
from benchmarks.data import DataNotGiven, checkpoint_path, cifar10_test_path
from service.cli import app
from service.errors import ConfigError
from service.settings import load_settings

CHECKOUT = Path(__file__).resolve().parent.parent
PACKAGES = ("adapters", "service", "benchmarks")
DATA_VARIABLES = ("TTA_SHARED", "TTA_CIFAR10", "TTA_CIFAR10C_DIR", "TTA_MODELS_DIR")


# --------------------------------------------------------------------------- nothing found by install location
def test_no_installed_module_builds_a_path_from_its_own_location() -> None:
    """``__file__``-relative paths break once installed (they point into site-packages); assets use
    ``importlib.resources`` and user data comes from flags or variables."""
    offenders = []
    for package in PACKAGES:
        for path in sorted((CHECKOUT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            offenders += [
                f"{path.relative_to(CHECKOUT)}:{node.lineno}"
                for node in ast.walk(tree)
                if isinstance(node, ast.Name) and node.id == "__file__"
            ]
    assert offenders == [], f"paths derived from __file__: {offenders}"


# --------------------------------------------------------------------------- the official CIFAR-10 archive
def _batch(x: np.ndarray, y: np.ndarray) -> bytes:
    """A batch in the official layout: a protocol-2 pickle, bytes keys, N x 3072 planar RGB rows."""
    rows = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    return pickle.dumps(
        {b"batch_label": b"testing batch 1 of 1", b"labels": y.tolist(), b"data": rows,
         b"filenames": [b"img%d.png" % i for i in range(len(x))]},
        protocol=2,
    )  # fmt: skip


def _archive(path: Path, batches: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def official(cifar10, tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """The first 300 test images as the official ``cifar-10-python.tar.gz`` (and a train split of 5 x 20)."""
    x, y = cifar10[0][:300], cifar10[1][:300]
    batches = {"test_batch": _batch(x, y)}
    batches.update({f"data_batch_{i}": _batch(x[20 * i : 20 * i + 20], y[20 * i : 20 * i + 20]) for i in range(1, 6)})
    return _archive(tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz", batches), x, y


def test_the_official_archive_and_its_extracted_folder_read_as_the_npz(official, tmp_path) -> None:
    archive, x, y = official
    for source in (archive, _extracted(archive, tmp_path), tmp_path / "cifar-10-batches-py"):
        images, labels = load_images(source)
        np.testing.assert_array_equal(images, x)
        np.testing.assert_array_equal(labels, y)
        assert images.dtype == np.uint8 and labels.dtype == np.int64
    train_x, train_y = load_images(archive, split="train")
    np.testing.assert_array_equal(train_x, x[20:120])
    np.testing.assert_array_equal(train_y, y[20:120])


def _extracted(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into  # the folder holding cifar-10-batches-py/: both spellings are accepted


def test_a_pickle_that_would_run_code_is_refused(tmp_path) -> None:
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    archive = _archive(tmp_path / "cifar-10-python.tar.gz", {"test_batch": pickle.dumps({b"data": Exploit()})})
    with pytest.raises(DataFileError, match=r"refusing to load .*system"):
        load_images(archive)


def test_unreadable_data_names_the_file_and_the_formats(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataFileError, match=r"notes\.txt is not a readable npz.*cifar-10-python\.tar\.gz"):
        load_images(tmp_path / "notes.txt")
    with pytest.raises(DataFileError, match="test_batch is missing"):
        load_images(tmp_path)
    with pytest.raises(DataFileError, match="data file not found"):
        load_images(tmp_path / "absent.npz")


def test_bench_runs_on_the_official_archive(official, resnet20_weights, tmp_path) -> None:
    archive, _, _ = official
    result = CliRunner().invoke(app, [
        "bench", "--clean-data", str(archive), "--weights", str(resnet20_weights), "--methods", "source",
        "--corruptions", "fog", "--limit", "100", "--batch-size", "50", "--forward-batches", "1", "--quiet",
        "--cache-dir", str(tmp_path),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "fog" in result.output and "source" in result.output


# --------------------------------------------------------------------------- data the user brings is named
@pytest.fixture
def no_data_variables(monkeypatch) -> None:
    for name in DATA_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_missing_data_names_the_flag_the_variable_and_the_format(no_data_variables) -> None:
    result = CliRunner().invoke(app, ["bench", "--limit", "10"])
    assert result.exit_code == 2
    assert "--clean-data" in result.output and "TTA_CIFAR10" in result.output and "TTA_SHARED" in result.output
    assert "cifar-10-python.tar.gz" in result.output and "docs/data.md" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback


def test_each_source_of_a_data_path_is_named_when_it_points_nowhere(no_data_variables, monkeypatch, shared) -> None:
    with pytest.raises(DataNotGiven, match=r"not found: /nowhere/test\.npz \(from --clean-data\)"):
        cifar10_test_path(Path("/nowhere/test.npz"))
    monkeypatch.setenv("TTA_CIFAR10", "/nowhere/env.npz")
    with pytest.raises(DataNotGiven, match=r"from TTA_CIFAR10"):
        cifar10_test_path()
    monkeypatch.setenv("TTA_MODELS_DIR", "/nowhere")
    with pytest.raises(DataNotGiven, match=r"akamaster_resnet20-12fca82f\.th \(from TTA_MODELS_DIR\)"):
        checkpoint_path("resnet20")
    with pytest.raises(DataNotGiven, match="pass --weights FILE or set TTA_MODELS_DIR"):
        monkeypatch.delenv("TTA_MODELS_DIR")
        checkpoint_path("resnet20")
    monkeypatch.setenv("TTA_SHARED", str(shared))  # the convenience folder, below the specific variable
    assert checkpoint_path("resnet20") == shared / "models" / "akamaster_resnet20-12fca82f.th"
    assert cifar10_test_path(Path(__file__)) == Path(__file__)  # the flag wins over every variable


# --------------------------------------------------------------------------- configuration mistakes
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("modles:\n  - name: a\n    architecture: digits\n", r"modles: unknown setting .*did you mean 'models'"),
        ("models:\n  - name: a\n    architecure: digits\n", r"models\.0\.architecure: unknown setting.*'architecture'"),
        ("prot: 9000\n", r"prot: unknown setting .*did you mean 'port'"),
    ],
)
def test_an_unknown_config_key_fails_naming_it_and_the_closest(tmp_path, text, message) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(config)
    result = CliRunner().invoke(app, ["serve", "--config", str(config)])
    assert result.exit_code == 2
    assert "unknown setting" in result.output


def test_flags_beat_variables_beat_the_config_file(tmp_path, monkeypatch) -> None:
    config = tmp_path / "models.toml"
    config.write_text('port = 9001\nhost = "0.0.0.0"\n')
    monkeypatch.delenv("TTA_PORT", raising=False)
    monkeypatch.delenv("TTA_HOST", raising=False)
    assert (load_settings(config).port, load_settings(config).host) == (9001, "0.0.0.0")
    monkeypatch.setenv("TTA_PORT", "9002")
    assert (load_settings(config).port, load_settings(config).host) == (9002, "0.0.0.0")
    assert load_settings(config, port=9003).port == 9003
    monkeypatch.setenv("TTA_CONFIG", str(config))  # the file named by its variable: the same order
    assert load_settings().port == 9002


def test_serve_help_states_the_order_and_version_prints() -> None:
    help_text = " ".join(CliRunner().invoke(app, ["serve", "--help"]).output.split())
    assert "command-line flags, then TTA_* environment variables, then the config file" in help_text
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("tta-serve ")

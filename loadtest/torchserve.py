"""TorchServe for the side-by-side benchmark: a cached private venv, a model archive, a server process.

TorchServe is the benchmark's reference, never a dependency of the project: ``torchserve`` and
``torch-model-archiver`` go into a venv of their own under the cache folder (built on first use,
reused after). The venv sees this interpreter's site-packages, so the handler imports the project's
model code and the same torch; ``torch`` is pinned to the project's exact version all the same, since
a looser requirement would pull a multi-GB CUDA build where torch is missing. Java comes from the
system (Debian: ``openjdk-17-jre-headless``).

The server runs in its own process group in the foreground, on loopback ports, with token auth, model
API and system metrics off (nothing leaves the machine); :meth:`TorchServe.stop` ends the Java
frontend and its Python workers together.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from loadtest.processes import HOST, ProcessError, _tail, free_port, require_binary

TORCHSERVE_VERSION = "0.12.0"
TORCH_PIN = "torch==2.13.0"  # the project's own pin (pyproject.toml): a CPU wheel on local disk
REQUIREMENTS = (f"torchserve=={TORCHSERVE_VERSION}", f"torch-model-archiver=={TORCHSERVE_VERSION}", TORCH_PIN)
HANDLER = Path(__file__).with_name("torchserve_handler.py")
REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "resnet20"
# Warnings and errors only: TorchServe's default logs every request (access log, per-request metrics) at INFO,
# which costs its frontend CPU that tta-serve, run with --log-level warning, does not spend.
LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT"><PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/></Console>
  </Appenders>
  <Loggers>
    <Root level="warn"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tta-serve"


def require_java() -> str:
    """The ``java`` executable TorchServe's frontend runs on, or a clear error naming the package."""
    return require_binary("java", "TorchServe's frontend needs a Java 11+ runtime", "openjdk-17-jre-headless")


def ensure_venv(cache_dir: Path, log=print) -> Path:
    """The venv holding TorchServe (created and installed on first use, then reused); returns its bin folder.

    A marker file records what was installed and by which interpreter; a venv without it (an install
    cut off half way) or with other contents is rebuilt from scratch.
    """
    venv = cache_dir / "torchserve-venv"
    bindir = venv / "bin"
    marker = venv / "tta-serve-requirements.json"
    wanted = {"python": sys.executable, "version": sys.version, "requirements": list(REQUIREMENTS)}
    if marker.is_file() and json.loads(marker.read_text()) == wanted and (bindir / "torchserve").is_file():
        return bindir
    if venv.exists():
        log(f"rebuilding the TorchServe venv {venv} (incomplete or for other requirements)")
        shutil.rmtree(venv)
    log(f"creating a venv for TorchServe {TORCHSERVE_VERSION} in {venv} (once; later runs reuse it)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    log(f"installing {' '.join(REQUIREMENTS)} into it (pip's progress follows)")
    try:
        subprocess.run([str(bindir / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                        "--progress-bar", "on", *REQUIREMENTS], check=True, timeout=1200)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise ProcessError(f"could not install TorchServe into {venv}: {exc} (pip's output is above)") from exc
    marker.write_text(json.dumps(wanted))
    return bindir


@dataclass(frozen=True)
class TorchServeConfig:
    """One TorchServe setting of the comparison: workers, torch threads per worker, batching."""

    workers: int
    threads: int
    batch_size: int = 64
    max_batch_delay_ms: int = 5


def model_config_yaml(config: TorchServeConfig, weights: Path) -> str:
    """TorchServe's per-model ``model-config.yaml``: batching, workers, and the handler's own section.

    JSON is valid YAML, so no YAML writer is needed.
    """
    return json.dumps({
        "minWorkers": config.workers, "maxWorkers": config.workers, "batchSize": config.batch_size,
        "maxBatchDelay": config.max_batch_delay_ms, "responseTimeout": 120,
        "handler": {"repo": str(REPO), "weights": str(weights), "architecture": MODEL_NAME,
                    "threads": config.threads},
    }, indent=2)


def archive_model(bindir: Path, folder: Path, config: TorchServeConfig, weights: Path) -> Path:
    """A model store in ``folder`` holding ``resnet20.mar`` (handler + model-config.yaml; weights by path)."""
    store = folder / "model-store"
    store.mkdir(parents=True, exist_ok=True)
    yaml = folder / "model-config.yaml"
    yaml.write_text(model_config_yaml(config, weights))
    subprocess.run([str(bindir / "torch-model-archiver"), "--model-name", MODEL_NAME, "--version", "1.0",
                    "--handler", str(HANDLER), "--config-file", str(yaml), "--export-path", str(store), "--force"],
                   check=True, capture_output=True, timeout=120)
    return store


class TorchServe:
    """A TorchServe process on free loopback ports serving ``resnet20`` with one configuration."""

    def __init__(self, bindir: Path, folder: Path, config: TorchServeConfig, weights: Path) -> None:
        self.bindir, self.folder, self.config, self.weights = bindir, folder, config, weights
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.path = f"/predictions/{MODEL_NAME}"
        self.log = folder / "torchserve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> TorchServe:
        require_java()
        self.folder.mkdir(parents=True, exist_ok=True)
        store = archive_model(self.bindir, self.folder, self.config, self.weights)
        properties = self.folder / "config.properties"
        properties.write_text("\n".join([
            f"inference_address=http://{HOST}:{self.port}",
            f"management_address=http://{HOST}:{free_port()}",
            f"metrics_address=http://{HOST}:{free_port()}",
            "disable_system_metrics=true",
            "disable_token_authorization=true",
            "enable_model_api=false",
            "install_py_dep_per_model=false",
            f"default_workers_per_model={self.config.workers}",
            "job_queue_size=1000",
            f"model_store={store}",
            f"load_models={MODEL_NAME}.mar",
        ]) + "\n")
        log_config = self.folder / "log4j2.xml"
        log_config.write_text(LOG4J2)
        env = {**os.environ, "LOG_LOCATION": str(self.folder / "logs"), "METRICS_LOCATION": str(self.folder / "logs"),
               "PATH": f"{self.bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(self.bindir / "torchserve"), "--foreground", "--ncs", "--disable-token-auth",
                 "--ts-config", str(properties), "--model-store", str(store), "--log-config", str(log_config)],
                cwd=self.folder, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        return self

    def wait_ready(self, probe: bytes, timeout: float = 180.0) -> float:
        """Seconds until a real prediction of ``probe`` answers 200 (every worker loaded the model)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc is None or self.proc.poll() is not None:
                raise ProcessError(f"TorchServe exited:\n{_tail(self.log)}")
            try:
                if httpx.post(self.base + self.path, content=probe, timeout=5).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise ProcessError(f"TorchServe not ready after {timeout:.0f} s:\n{_tail(self.log)}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the whole process group (frontend and workers), SIGKILL if it lingers."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers that outlived the frontend
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None

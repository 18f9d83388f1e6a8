"""Build the CPU image from the repository's Dockerfile with buildah, run it and check it. No Docker.

    sudo python3 deploy/build_and_run_image.py             # as root, from anywhere; Python 3.11+, stdlib only

Why it looks like this: a machine without a Docker daemon and without access to a container registry
can still build and run the real image, and that is what this script does, step by step:

1. **Tools.** ``buildah`` and ``debootstrap`` from the distribution's packages (installed with apt-get
   when missing). buildah runs as root with ``--storage-driver vfs --isolation chroot``, which needs
   neither a daemon nor overlay mounts nor cgroups.
2. **A local base image** (``localhost/tta-serve-base:bookworm``, kept between runs; ``--rebuild-base``
   makes it again): Debian bookworm from ``debootstrap`` with its ``python3`` (3.11), ``python3-venv``
   and ``passwd``, imported with ``buildah from scratch`` + copy + ``commit``. It stands in for the
   Dockerfile's default ``python:3.12-slim``, which cannot be pulled here. The only local addition is
   this machine's CA bundle (``/etc/ssl/certs/ca-certificates.crt``) with an ``/etc/pip.conf`` that
   points pip at it, so that pip inside the build trusts what this machine trusts (a TLS-inspecting
   proxy, where there is one). The Debian mirror is the one in this machine's apt sources.
3. **torch.** The Dockerfile installs ``torch==<pin>`` from ``TORCH_INDEX`` (its documented build
   argument; default the PyTorch CPU index for ``VARIANT=cpu``). Where that index cannot be reached,
   ``pip download`` on this machine (its pip configuration knows where the CPU wheel lies) fetches the
   pinned wheel and its dependencies, and a PEP 503 index of them is served on 127.0.0.1 for the
   duration of the build (buildah's chroot isolation shares the host's network).
   ``--torch-index URL`` uses an index you name instead; ``--torch-index default`` passes none.
4. **The build**: ``buildah bud --format docker`` (the Docker format keeps ``HEALTHCHECK``) of the
   repository's own Dockerfile with ``VARIANT=cpu``, ``CPU_BASE_IMAGE=<the local base>`` and
   ``TORCH_INDEX``. Nothing else differs from ``docker build --build-arg VARIANT=cpu .``.
5. **The run**, as a container runtime would, in private mount and PID namespaces (``unshare``): the
   container's root file system mounted **read-only**, a fresh ``/proc``, a ``tmpfs`` at ``/tmp`` (as
   ``deploy/k8s`` gives the pods), a minimal ``/dev`` with a ``/dev/shm``; then the image's ``ENTRYPOINT`` with its
   ``Env`` and ``WorkingDir``, as its ``User``. The network is the host's, so the server gets
   ``TTA_PORT`` set to a free port (``docker run -e TTA_PORT=...``).
6. **Checks**, each printed as PASS or FAIL: the server becomes ready; the image's ``HEALTHCHECK``
   command, run inside the container (``nsenter``, like ``docker exec``), exits 0; one ``/v2`` infer
   answers 200 with ``[1, 10]`` probabilities; the server process runs as the image's non-root uid;
   writing into the root file system, even where that user owns the folder, fails as read-only.

Exit status 0 when every check passes, 1 when one fails, 2 on bad arguments or a missing prerequisite.
``--skip-build`` runs the checks on the image built last time. Phase times are printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
STORE = ["--storage-driver", "vfs"]
BASE_IMAGE = "localhost/tta-serve-base:bookworm"
IMAGE = "localhost/tta-serve:0.1.0-cpu"
SUITE = "bookworm"  # Debian 12: its python3 is 3.11, which pyproject.toml's requires-python accepts
BASE_PACKAGES = "python3,python3-venv,passwd,ca-certificates"
READY_TIMEOUT_S = 180.0


class Phases:
    """Wall-clock time of each phase, printed as a table at the end."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.times: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        print(f"\n=== {name}", flush=True)
        began = time.monotonic()
        try:
            yield
        finally:
            self.times.append((name, time.monotonic() - began))
            print(f"=== {name}: {time.monotonic() - began:.1f} s", flush=True)

    def report(self) -> None:
        print("\nphase times (wall clock):")
        for name, seconds in self.times:
            print(f"  {seconds:8.1f} s  {name}")
        print(f"  {time.monotonic() - self.start:8.1f} s  total")


def run(cmd: list[str], capture: bool = False, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, echoing it; captured output is returned, otherwise it streams to the terminal."""
    print("$ " + shlex.join(cmd), flush=True)
    return subprocess.run(cmd, check=check, text=True, capture_output=capture)


def buildah(*args: str, capture: bool = True, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["buildah", *STORE, *args], capture=capture, check=check)


# ---------------------------------------------------------------------- 1. tools
def ensure_tools() -> None:
    """buildah, debootstrap and util-linux's unshare/nsenter, from the distribution when missing."""
    wanted = {"buildah": "buildah", "debootstrap": "debootstrap", "unshare": "util-linux", "nsenter": "util-linux"}
    missing = sorted({package for tool, package in wanted.items() if shutil.which(tool) is None})
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    print(run(["buildah", "--version"], capture=True).stdout.strip())


# ---------------------------------------------------------------------- 2. the base image
def debian_mirror() -> str:
    """The Debian archive this machine's apt uses (one-line or deb822 sources), for debootstrap."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        for uri, suites in re.findall(r"^URIs:\s*(\S+)\s*\nSuites:\s*([^\n]+)", text, re.MULTILINE):
            if SUITE in suites.split() and uri.rstrip("/").endswith("/debian"):
                return uri
        for uri, suite in re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.MULTILINE):
            if suite == SUITE and uri.rstrip("/").endswith("/debian"):
                return uri
    raise SystemExit(f"no Debian {SUITE} archive in /etc/apt/sources.list*: pass --mirror URL")


def image_exists(name: str) -> bool:
    return buildah("inspect", "--type", "image", name, check=False).returncode == 0


def make_base(work: Path, mirror: str | None) -> None:
    """Debian bookworm with its python3, imported as ``BASE_IMAGE``."""
    rootfs = work / "rootfs"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    mirror, previous = mirror or debian_mirror(), image_id(BASE_IMAGE)
    run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", SUITE, str(rootfs), mirror])
    for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    # Trust what this machine trusts (a TLS-inspecting proxy's CA, where there is one), for pip too.
    shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/ca-certificates.crt")
    (rootfs / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    container = buildah("from", "scratch").stdout.strip()
    try:
        mount = buildah("mount", container).stdout.strip()
        run(["cp", "-a", f"{rootfs}/.", mount + "/"])
        buildah("umount", container)
        buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--env", "LANG=C.UTF-8", "--cmd", '["python3"]', container)
        buildah("commit", "--format", "docker", container, BASE_IMAGE)
    finally:
        buildah("rm", container, check=False)
    shutil.rmtree(rootfs)
    if previous and previous != image_id(BASE_IMAGE):
        buildah("rmi", previous, check=False)  # refused while an image built on it remains: fine


# ---------------------------------------------------------------------- 3. torch
def torch_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if re.match(r"torch\s*==", d)]
    return pin.split("==")[1].strip()


def torch_index(work: Path) -> Path:
    """A PEP 503 index (``simple/<project>/<wheel>``) of the pinned torch and its dependencies."""
    wheels, index = work / "wheels", work / "index" / "simple"
    shutil.rmtree(work / "index", ignore_errors=True)
    wheels.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "-d", str(wheels), f"torch=={torch_pin()}"])
    for wheel in wheels.glob("*.whl"):
        project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        (index / project).mkdir(parents=True, exist_ok=True)
        os.link(wheel, index / project / wheel.name)
    return index.parent


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on a free 127.0.0.1 port (directory listings are valid PEP 503 pages)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    finally:
        server.shutdown()


# ---------------------------------------------------------------------- 4. the build
def containers() -> set[str]:
    return set(buildah("containers", "--quiet", "--notruncate").stdout.split())


def image_id(name: str) -> str | None:
    found = buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", name, check=False)
    return found.stdout.strip() or None if found.returncode == 0 else None


def build(torch_index_url: str | None) -> None:
    """``buildah bud`` of the Dockerfile; then remove what the build left in the store: the stages'
    working containers (buildah 1.28 keeps some) and the previous build of ``IMAGE``, now untagged."""
    args = ["--build-arg", "VARIANT=cpu", "--build-arg", f"CPU_BASE_IMAGE={BASE_IMAGE}"]
    if torch_index_url:
        args += ["--build-arg", f"TORCH_INDEX={torch_index_url}"]
    before, previous = containers(), image_id(IMAGE)
    try:
        buildah("bud", "--format", "docker", "--isolation", "chroot", "--pull=never", *args,
                "-f", str(DOCKERFILE), "-t", IMAGE, str(ROOT), capture=False)
    finally:
        for container in sorted(containers() - before):
            buildah("rm", container, check=False)
    if previous and previous != image_id(IMAGE):
        buildah("rmi", previous, check=False)


# ---------------------------------------------------------------------- 5. the run
def image_config() -> dict[str, Any]:
    """The image's Docker-format config (User, Env, Entrypoint, WorkingDir, Healthcheck, ...)."""
    return json.loads(buildah("inspect", "--type", "image", IMAGE).stdout)["Docker"]["config"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_ids(config: dict[str, Any]) -> tuple[int, int]:
    user = config.get("User") or "0"
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise SystemExit(f"the image's USER {user!r} is not numeric: this script needs uid:gid")
    return int(uid), int(gid or uid)


def container_script(rootfs: str, config: dict[str, Any], port: int) -> str:
    """What runs in the new mount and PID namespaces: a read-only root, then the entry point."""
    uid, gid = user_ids(config)
    env = container_env(config, port)
    command = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    workdir = config.get("WorkingDir") or "/"
    r = shlex.quote(rootfs)
    devices = " ".join(f"touch {r}/dev/{d} && mount --bind /dev/{d} {r}/dev/{d};" for d in
                       ("null", "zero", "random", "urandom", "full"))
    return (
        "set -e\n"
        f"mount --bind {r} {r}\n"
        f"mount -o remount,bind,ro {r}\n"  # the container's root file system, read-only
        f"mount -t proc proc {r}/proc\n"
        f"mount -t tmpfs -o mode=1777,size=256m tmpfs {r}/tmp\n"
        f"mount -t tmpfs -o mode=755,size=1m tmpfs {r}/dev\n"
        f"{devices}\n"
        f"mkdir {r}/dev/shm && mount -t tmpfs -o mode=1777,size=64m tmpfs {r}/dev/shm\n"  # Docker's default
        f"exec chroot --userspec={uid}:{gid} --groups={gid} {r} /usr/bin/env -i -C {shlex.quote(workdir)} "
        + shlex.join([*env, *command])
        + "\n"
    )


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def server_pid(unshare_pid: int) -> int | None:
    """The container's first process: unshare forks it (pid 1 in the namespace), then it execs the server."""
    found = children(unshare_pid)
    return found[0] if found else None


def uids_of(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    return []


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def infer(base: str) -> tuple[int, dict[str, Any]]:
    body = {"id": "image-check", "inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                              "data": [0.5] * (3 * 32 * 32)}]}
    request = urllib.request.Request(f"{base}/v2/models/digits/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode(errors="replace")}


def container_env(config: dict[str, Any], port: int) -> list[str]:
    """The image's ``Env`` with ``TTA_PORT`` set as ``docker run -e TTA_PORT=<port>`` would."""
    return [e for e in config.get("Env") or [] if not e.startswith("TTA_PORT=")] + [f"TTA_PORT={port}"]


def in_container(pid: int, config: dict[str, Any], port: int, command: list[str]) -> subprocess.CompletedProcess[str]:
    """``docker exec``: the server's namespaces and root, its working directory, the image's user and env."""
    uid, gid = user_ids(config)
    env = container_env(config, port)
    return run(["nsenter", "--target", str(pid), "--mount", "--pid", "--root", "--wd",
                f"--setuid={uid}", f"--setgid={gid}", "--", "/usr/bin/env", "-i", *env, *command],
               capture=True, check=False)


def check_container(phases: Phases) -> list[str]:
    """Run the image read-only as its user; return the failed checks."""
    config = image_config()
    print("image config:", json.dumps({k: config.get(k) for k in ("User", "Entrypoint", "Cmd", "WorkingDir",
                                                                   "ExposedPorts", "Healthcheck")}, indent=1))
    failures: list[str] = []

    def verdict(ok: bool, what: str, detail: str = "") -> None:
        print(f"{'PASS' if ok else 'FAIL'}  {what}" + (f": {detail}" if detail else ""), flush=True)
        if not ok:
            failures.append(what)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with phases.phase("buildah from (the vfs driver copies the image's files)"):
        container = buildah("from", "--pull=never", IMAGE).stdout.strip()
    log_fd, log_name = tempfile.mkstemp(prefix="tta-serve-container-", suffix=".log")
    unshare = None
    try:
        rootfs = buildah("mount", container).stdout.strip()
        script = container_script(rootfs, config, port)
        print(script)
        unshare = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "bash", "-c", script],
                                   stdout=log_fd, stderr=subprocess.STDOUT)
        with phases.phase("start until /v2/health/ready"):
            deadline = time.monotonic() + READY_TIMEOUT_S
            status = 0
            while time.monotonic() < deadline and unshare.poll() is None:
                status, _ = get(f"{base}/v2/health/ready", timeout=2)
                if status == 200:
                    break
                time.sleep(0.5)
        verdict(status == 200, "the server becomes ready", f"GET /v2/health/ready -> {status}")
        pid = server_pid(unshare.pid)
        if status != 200 or pid is None:
            return [*failures, "the container did not start"]

        health = (config.get("Healthcheck") or {}).get("Test") or []
        if health[:1] == ["CMD"]:
            done = in_container(pid, config, port, health[1:])
            verdict(done.returncode == 0, "the image's HEALTHCHECK command passes",
                    f"exit {done.returncode} {done.stderr.strip()[-300:]}")
        else:
            verdict(False, "the image's HEALTHCHECK command passes", f"no exec-form HEALTHCHECK in {health}")

        code, answer = infer(base)
        shape = (answer.get("outputs") or [{}])[0].get("shape")
        verdict(code == 200 and shape == [1, 10], "POST /v2/models/digits/infer answers 200",
                f"{code}, outputs[0].shape={shape}, parameter_version="
                f"{(answer.get('parameters') or {}).get('parameter_version')}")

        uid, _ = user_ids(config)
        ids = uids_of(pid)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        verdict(uid != 0 and set(ids) == {uid}, "the server runs as the image's non-root user",
                f"pid {pid} ({cmdline}) uids {ids}, image USER {config.get('User')}")

        home = config.get("WorkingDir") or "/tmp"
        attempt = in_container(pid, config, port, ["python", "-c", f"open('{home}/write-test', 'w')"])
        verdict(attempt.returncode != 0 and "Read-only file system" in attempt.stderr,
                "the root file system is read-only (writing into the user's own home fails)",
                attempt.stderr.strip().splitlines()[-1] if attempt.stderr.strip() else f"exit {attempt.returncode}")
        tmp = in_container(pid, config, port, ["python", "-c", "open('/tmp/write-test', 'w').write('ok')"])
        verdict(tmp.returncode == 0, "/tmp (a tmpfs, as in deploy/k8s) stays writable", f"exit {tmp.returncode}")
        return failures
    finally:
        if unshare is not None and unshare.poll() is None:
            pid = server_pid(unshare.pid)
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
            try:
                unshare.wait(timeout=30)
            except subprocess.TimeoutExpired:
                unshare.kill()
                unshare.wait()
        os.close(log_fd)
        lines = Path(log_name).read_text(errors="replace").splitlines()
        print(f"--- container output (last 15 of {len(lines)} lines; all in {log_name})")
        print("\n".join(lines[-15:]))
        buildah("umount", container, check=False)
        buildah("rm", container, check=False)


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/tta-serve-image"),
                        help="scratch folder for the base root file system and the torch index")
    parser.add_argument("--mirror", help="Debian archive for debootstrap (default: the one apt uses)")
    parser.add_argument("--rebuild-base", action="store_true", help=f"make {BASE_IMAGE} again")
    parser.add_argument("--torch-index", help="TORCH_INDEX for the build ('default': the Dockerfile's own); "
                                              "default: a local index of this machine's torch wheel")
    parser.add_argument("--skip-build", action="store_true", help=f"only run and check {IMAGE}")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("run as root: buildah's vfs store, debootstrap, mounts and namespaces need it", file=sys.stderr)
        return 2

    phases = Phases()
    args.work.mkdir(parents=True, exist_ok=True)
    with phases.phase("tools"):
        ensure_tools()
    if not args.skip_build:
        with phases.phase(f"base image {BASE_IMAGE}"):
            if args.rebuild_base or not image_exists(BASE_IMAGE):
                make_base(args.work, args.mirror)
            else:
                print(f"{BASE_IMAGE} exists (--rebuild-base makes it again)")
        with phases.phase("torch index"):
            index = None if args.torch_index else torch_index(args.work)
        with phases.phase(f"buildah bud {IMAGE} (VARIANT=cpu)"):
            if index is None:
                build(None if args.torch_index == "default" else args.torch_index)
            else:
                with serve_directory(index) as url:
                    build(url)
        print(buildah("images", IMAGE).stdout)
    elif not image_exists(IMAGE):
        print(f"{IMAGE} does not exist: run without --skip-build first", file=sys.stderr)
        return 2
    failures = check_container(phases)
    phases.report()
    print("\nALL CHECKS PASSED" if not failures else f"\nFAILED: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

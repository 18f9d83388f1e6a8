"""The deploy folder against a real Prometheus: configuration and rules pass promtool, and every PromQL
expression of the Grafana dashboard and of the rules evaluates to series on a running tta-serve.

Prometheus and promtool come from the Debian package ``prometheus`` (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from servers import RedisProcess, free_port, running_server

from adapters.models.digits import digits_split, load_digits_model
from service.v2_client import binary_request, parse_response

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tta-serve.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
COMPOSE = DEPLOY / "docker-compose.yml"
REQUIRED_ROWS = ("Traffic", "Adaptation", "Forgetting", "Calibration", "Replicas")
OPTIONAL_ROWS = ("CLIP routing",)  # series exist only where CLIP routing is configured: parsed, not required
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$model": ".*"}
COMPARISON = re.compile(r"\s(==|!=|>=|<=|>|<)\s(?!bool\b)")


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package 'prometheus'; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def dashboard_panels() -> list[tuple[str, dict[str, Any]]]:
    """(row title, panel) for every panel, including those inside collapsed rows."""
    found, row = [], ""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            found += [(row, p) for p in panel.get("panels", [])]
        else:
            found.append((row, panel))
    return found


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(row, panel title, PromQL with Grafana's variables filled in) of every panel target."""
    queries = []
    for row, panel in dashboard_panels():
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((row, panel["title"], expr))
    return queries


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def signal_of(expr: str) -> str:
    """An alert's condition with every comparison made a ``bool`` one: series whenever its inputs exist."""
    return COMPARISON.sub(lambda m: f" {m.group(1)} bool ", expr)


# ------------------------------------------------------------------------------------ static checks
def test_promtool_accepts_the_config_and_rules_and_the_rule_unit_tests_pass():
    promtool = binary("promtool")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"],
                 ["test", "rules", "rules_test.yml"]):
        done = subprocess.run([promtool, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


def test_dashboard_json_is_valid_with_unique_panel_ids_and_the_operator_rows():
    dashboard = json.loads(DASHBOARD.read_text())
    nested = [p for row in dashboard["panels"] for p in row.get("panels", [])]
    ids = [p["id"] for p in dashboard["panels"] + nested]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows[: len(REQUIRED_ROWS)] == list(REQUIRED_ROWS)
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    for row, panel in dashboard_panels():
        assert row, f"panel {panel['title']!r} sits outside a row"
        assert panel["datasource"]["uid"] == uid and panel["targets"], panel["title"]
        assert all(t["datasource"]["uid"] == uid and t["expr"] for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    assert dashboard["templating"]["list"][0]["datasource"]["uid"] == uid


def test_compose_wires_the_provisioning_and_the_rules_where_they_are_read():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"tta-serve", "redis", "prometheus", "grafana"} <= set(services)
    assert services["tta-serve"]["build"]["context"] == ".."
    assert services["tta-serve"]["environment"]["TTA_REDIS_URL"].startswith("redis://redis:")
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    provider_path = yaml.safe_load(PROVIDERS.read_text())["providers"][0]["options"]["path"]
    assert f"./grafana/dashboards:{provider_path}:ro" in services["grafana"]["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in services["grafana"]["volumes"]
    assert yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["url"] == "http://prometheus:9090"


# ------------------------------------------------------------------------------------ live
class Prometheus:
    """A private Prometheus: its own port, its data under ``folder``, always stopped."""

    def __init__(self, folder: Path, target: str) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "tta-serve", "static_configs": [{"targets": [target]}]}],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = folder / "prometheus.log"
        self.proc: subprocess.Popen | None = None
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def start(self) -> Prometheus:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [binary("prometheus"), f"--config.file={self.folder / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.folder / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                cwd=self.folder, stdout=out, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"prometheus not ready:\n{self.log.read_text()}")

    def query(self, expr: str) -> dict[str, Any]:
        return self.client.get("/api/v1/query", params={"query": expr}).json()

    def series(self, expr: str) -> int:
        answer = self.query(expr)
        return len(answer["data"]["result"]) if answer["status"] == "success" else 0

    def stop(self) -> None:
        self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def redis() -> Iterator[RedisProcess]:
    server = RedisProcess().start()
    try:
        yield server
    finally:
        server.kill()


def drive(base: str) -> None:
    """Traffic that makes every series exist: predictions, delayed labels, client errors."""
    _, (x, y) = digits_split()
    with httpx.Client(base_url=base, timeout=30) as client:
        ids: list[str] = []
        for i in range(6):
            body, headers = binary_request(x[i * 64 : (i + 1) * 64])
            ids += parse_response(client.post("/v2/models/digits/infer", content=body, headers=headers))[1][
                "parameters"]["request_ids"].split(",")
        body, headers = binary_request(x[:64])
        assert client.post("/v2/models/digits-c/infer", content=body, headers=headers).status_code == 200
        labels = {rid: int(t) for rid, t in zip(ids, y, strict=False)}
        assert client.post("/v1/models/digits/feedback", json={"labels": labels}).status_code == 200
        assert client.post("/v2/models/no-such-model/infer", json={"inputs": []}).status_code == 404
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the agreement thread and the probe loop catch up
            health = client.get("/v1/models/digits/adaptation").json()["health"]
            if health["source_agreement_ratio"] is not None and health["probe_accuracy_ratio"] is not None:
                return
            time.sleep(0.2)
        pytest.fail(f"health never complete: {health}")


def test_every_dashboard_and_rule_expression_returns_series(tmp_path, redis):
    load_digits_model()  # trained once into the session cache, so the server starts quickly
    port = free_port()
    config = tmp_path / "models.yaml"
    config.write_text(yaml.safe_dump({"models": [{
        "name": "digits", "architecture": "digits", "method": "eata", "agreement_fraction": 1.0,
        "probe_every_s": 2, "probe_size": 200,
    }, {"name": "digits-c", "architecture": "digits", "method": "eata-c"}]}))  # EATA-C: the divergence panels
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{port}").start()
    try:
        with running_server(config, env={"TTA_REDIS_URL": redis.url}, port=port) as (base, _):
            drive(base)
            # Scraped after the traffic, every series (requests included) with enough samples for rate().
            ready = ["tta_feedback_window_samples > 0", "tta_source_agreement_ratio", "tta_probe_samples",
                     'min(count_over_time(tta_requests_total{route!~"/metrics|/v2/health/.*"}[1m])) >= 3',
                     *[rule["record"] for rule in rules() if "record" in rule]]
            deadline = time.monotonic() + 30
            while not all(prometheus.series(q) for q in ready) and time.monotonic() < deadline:
                time.sleep(0.5)
            failures = []
            for row, title, expr in dashboard_queries():
                answer = prometheus.query(expr)
                if answer["status"] != "success":
                    failures.append(f"dashboard {row} / {title}: {expr}\n  error: {answer.get('error')}")
                elif not answer["data"]["result"] and row not in OPTIONAL_ROWS:
                    failures.append(f"dashboard {row} / {title}: {expr}\n  no series")
            for rule in rules():
                name = rule.get("alert") or rule["record"]
                checks = [rule["expr"], signal_of(rule["expr"])] if "alert" in rule else [rule["expr"], name]
                for i, expr in enumerate(checks):
                    answer = prometheus.query(expr)
                    if answer["status"] != "success":
                        failures.append(f"rule {name}: {expr}\n  error: {answer.get('error')}")
                    elif i == 1 and not answer["data"]["result"]:
                        failures.append(f"rule {name}: {expr}\n  no series")
            if not prometheus.series("group by (model) (tta_model_info)"):  # the dashboard's model variable
                failures.append("template variable: no tta_model_info{model}")
            assert not failures, "\n".join(failures)
    finally:
        prometheus.stop()

#!/usr/bin/env python3
"""Checks docker/compose.yaml against the code, without a Docker engine.

Run by `make test` (after the binaries are built) and `make check-compose`.
Every claim the compose file makes about kgs is checked against the real
thing:

- every KGS_* variable and every --flag given to kgs-producer or kgs-app-server
  appears in that binary's own `--help` (clap prints `[env: X=]`, or
  `[env: X]` for a secret whose value it hides);
- the HTTP port of each kgs service (KGS_HTTP_ADDR) is the one its health
  check, `ports`/`expose`, the Dockerfile's EXPOSE and docker/prometheus.yml
  use, and the health-check paths are routes in the code;
- every bind-mounted file exists, the Prometheus rule file and the Grafana
  dashboard folder are mounted where the configs expect them, and the
  Grafana datasource points at the Prometheus service;
- build contexts, Dockerfile and targets exist; depends_on names real
  services, `service_healthy` ones have a health check and
  `service_completed_successfully` ones are one-shot;
- `promtool check config` accepts docker/prometheus.yml (rule path mapped to
  the repo), and `docker compose config` (or docker-compose v1) accepts the
  file when such a tool is installed; otherwise that step is reported skipped.

Binaries: $CARGO_TARGET_DIR (default target)/debug/{kgs-producer,kgs-app-server}.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"
# Dockerfile target -> (binary in the target dir, source files with its HTTP routes).
BINARIES = {
    "producer": (TARGET / "kgs-producer", [ROOT / "producer/src/http.rs"]),
    "app-server": (TARGET / "kgs-app-server", [ROOT / "consumer-lib/src/bin/kgs-app-server.rs"]),
}

problems = []


def problem(msg):
    problems.append(msg)


def help_text(binary, sub=None):
    args = [str(binary)] + ([sub] if sub else []) + ["--help"]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        problem(f"{' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def urls_in_healthcheck(svc):
    test = svc.get("healthcheck", {}).get("test", [])
    text = " ".join(test) if isinstance(test, list) else str(test)
    return [urllib.parse.urlparse(u) for u in re.findall(r"https?://[^\s\"']+", text)]


def main():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    dockerfile_targets = {}
    kgs_services = {}  # name -> Dockerfile target

    # Images built from the repo: which binary each kgs service runs.
    images = {}
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                problem(f"{name}: Dockerfile {dockerfile} missing")
                continue
            text = dockerfile.read_text()
            dockerfile_targets[dockerfile] = text
            if not re.search(rf"^FROM\s+\S+\s+AS\s+{re.escape(build['target'])}\s*$", text, re.M | re.I):
                problem(f"{name}: no stage `{build['target']}` in {dockerfile}")
            images[svc["image"]] = (build["target"], text)
    for name, svc in services.items():
        if svc.get("image") in images:
            kgs_services[name] = images[svc["image"]][0]

    http_ports = {}  # service -> container port of its HTTP endpoints
    for name, target in kgs_services.items():
        svc = services[name]
        binary, route_files = BINARIES[target]
        if not binary.is_file():
            problem(f"{binary} not built (cargo build --workspace --bins)")
            continue
        command = svc.get("command", [])
        sub = command[0] if target == "producer" and command else None
        helptext = help_text(binary, sub)
        # Flags given on the command line.
        for arg in command:
            if arg.startswith("--"):
                flag = arg.split("=", 1)[0]
                if not re.search(rf"(^|\s){re.escape(flag)}[\s=<]", helptext, re.M):
                    problem(f"{name}: flag {flag} not in `{binary.name} {sub or ''} --help`")
        # Environment variables.
        env = svc.get("environment", {})
        for var in env:
            if var.startswith("KGS_") and not re.search(rf"\[env: {var}[=\]]", helptext):
                problem(f"{name}: {var} is not read by {binary.name} {sub or ''} (not in --help)")
        # The HTTP port, and everything that must agree with it.
        if "KGS_HTTP_ADDR" not in env:
            if sub in (None, "run"):
                problem(f"{name}: no KGS_HTTP_ADDR")
            continue
        port = port_of(env["KGS_HTTP_ADDR"])
        http_ports[name] = port
        routes = "".join(p.read_text() for p in route_files)
        for url in urls_in_healthcheck(svc):
            if url.port != port:
                problem(f"{name}: health check {url.geturl()} is not on port {port}")
            if f'.route("{url.path}"' not in routes:
                problem(f"{name}: health check path {url.path} is not a route in {route_files[0].name}")
        if not urls_in_healthcheck(svc):
            problem(f"{name}: no HTTP health check")
        for p in svc.get("ports", []):
            if int(str(p).rsplit(":", 1)[1]) != port:
                problem(f"{name}: port mapping {p} does not end at {port}")
        for p in svc.get("expose", []):
            if int(p) != port:
                problem(f"{name}: expose {p} is not {port}")
        stage = re.search(
            rf"^FROM\s+\S+\s+AS\s+{re.escape(target)}\s*$(.*?)(?=^FROM|\Z)",
            images[svc["image"]][1], re.M | re.S | re.I,
        )
        exposed = re.findall(r"^EXPOSE\s+(\d+)", stage.group(1) if stage else "", re.M)
        if [str(port)] != exposed:
            problem(f"{name}: Dockerfile stage {target} exposes {exposed}, the service listens on {port}")

    # depends_on.
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        deps = {d: {"condition": "service_started"} for d in deps} if isinstance(deps, list) else deps
        for dep, cond in deps.items():
            if dep not in services:
                problem(f"{name}: depends on unknown service {dep}")
                continue
            c = cond.get("condition")
            if c == "service_healthy" and "healthcheck" not in services[dep]:
                problem(f"{name}: waits for {dep} to be healthy, which has no health check")
            if c == "service_completed_successfully" and services[dep].get("restart", "no") != "no":
                problem(f"{name}: waits for {dep} to complete, which restarts")

    # Bind mounts: sources exist; remember where each file is mounted.
    mounts = {}  # service -> {container path: host path}
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            src, dst = str(v).split(":")[:2]
            if src.startswith((".", "/")):
                host = (DOCKER / src).resolve()
                if not host.exists():
                    problem(f"{name}: mounted {src} does not exist ({host})")
                mounts.setdefault(name, {})[dst] = host

    # Prometheus: its config and rules are mounted, and it scrapes the
    # kgs services on their real ports.
    prom = next((n for n, s in services.items() if "prometheus" in str(s.get("image", ""))), None)
    if prom is None:
        problem("no prometheus service")
    else:
        cmd = " ".join(services[prom].get("command", []))
        cfg_path = re.search(r"--config\.file=(\S+)", cmd)
        cfg_path = cfg_path.group(1) if cfg_path else "/etc/prometheus/prometheus.yml"
        host_cfg = mounts.get(prom, {}).get(cfg_path)
        if host_cfg is None:
            problem(f"{prom}: {cfg_path} is not mounted")
        else:
            cfg = yaml.safe_load(host_cfg.read_text())
            for rule in cfg.get("rule_files", []):
                if rule not in mounts.get(prom, {}):
                    problem(f"{prom}: rule file {rule} is not mounted")
            scraped = {}
            for job in cfg.get("scrape_configs", []):
                for sd in job.get("dns_sd_configs", []):
                    for n in sd["names"]:
                        scraped[n] = sd["port"]
                for sc in job.get("static_configs", []):
                    for t in sc["targets"]:
                        host, port = t.rsplit(":", 1)
                        scraped[host] = int(port)
            for name, port in http_ports.items():
                if name not in scraped:
                    problem(f"prometheus.yml does not scrape {name}")
                elif scraped[name] != port:
                    problem(f"prometheus.yml scrapes {name} on {scraped[name]}, it listens on {port}")
            for host in scraped:
                if host not in services:
                    problem(f"prometheus.yml scrapes {host}, which is no service")
            check_prometheus_config(host_cfg, mounts.get(prom, {}))

    # Grafana: provisioning mounted, the provider's dashboard folder mounted,
    # the datasource URL is the Prometheus service.
    graf = next((n for n, s in services.items() if "grafana" in str(s.get("image", ""))), None)
    if graf is None:
        problem("no grafana service")
    else:
        gm = mounts.get(graf, {})
        prov = gm.get("/etc/grafana/provisioning")
        if prov is None:
            problem(f"{graf}: /etc/grafana/provisioning is not mounted")
        else:
            for f in (prov / "dashboards").glob("*.yaml"):
                for p in yaml.safe_load(f.read_text()).get("providers", []):
                    path = p.get("options", {}).get("path")
                    if path not in gm:
                        problem(f"{graf}: dashboard provider path {path} is not mounted")
                    elif not list(gm[path].glob("*.json")):
                        problem(f"{graf}: no dashboards in {gm[path]}")
            uids = set()
            for f in (prov / "datasources").glob("*.yaml"):
                for d in yaml.safe_load(f.read_text()).get("datasources", []):
                    uids.add(d.get("uid"))
                    url = urllib.parse.urlparse(d["url"])
                    if url.hostname != prom or url.port != 9090:
                        problem(f"datasource {d['name']} points at {d['url']}, not {prom}:9090")
            # Every panel and target of every dashboard uses a provisioned datasource.
            for f in sorted((ROOT / "grafana/dashboards").glob("*.json")):
                for uid in set(re.findall(r'"uid":\s*"([^"]+)"', f.read_text())) - {json_uid(f)}:
                    if uid not in uids:
                        problem(f"{f.name}: datasource uid {uid} is not provisioned ({sorted(uids)})")
        home = services[graf].get("environment", {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
        if home:
            folder, file = home.rsplit("/", 1)
            if folder not in gm or not (gm[folder] / file).is_file():
                problem(f"{graf}: home dashboard {home} is not mounted")

    compose_tool_check()

    if problems:
        print(f"check-compose: {len(problems)} problem(s) in {COMPOSE.relative_to(ROOT)}:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        sys.exit(1)
    print(f"check-compose: {COMPOSE.relative_to(ROOT)} agrees with the code "
          f"({len(kgs_services)} kgs services, {len(services)} services)")


def json_uid(path):
    """The dashboard's own uid (not a datasource reference)."""
    return json.loads(path.read_text()).get("uid")


def check_prometheus_config(host_cfg, mounts):
    promtool = shutil.which("promtool")
    if not promtool:
        print("check-compose: promtool not installed, prometheus.yml only parsed", file=sys.stderr)
        return
    text = host_cfg.read_text()
    for dst, src in mounts.items():
        text = text.replace(dst, str(src))
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        f.write(text)
        f.flush()
        out = subprocess.run([promtool, "check", "config", f.name], capture_output=True, text=True)
        if out.returncode != 0:
            problem(f"promtool check config {host_cfg.name}: {out.stdout}{out.stderr}")


def compose_tool_check():
    for tool in (["docker", "compose"], ["docker-compose"]):
        if not shutil.which(tool[0]):
            continue
        if subprocess.run(tool + ["version"], capture_output=True).returncode != 0:
            continue
        out = subprocess.run(tool + ["-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
        if out.returncode != 0:
            problem(f"{' '.join(tool)} config: {out.stderr.strip()}")
        else:
            print(f"check-compose: `{' '.join(tool)} config` accepts the file")
        return
    print("check-compose: no docker compose / docker-compose installed: "
          "the file was checked by this script only", file=sys.stderr)


if __name__ == "__main__":
    main()

//! The Grafana dashboards and Prometheus alert rules of `grafana/`, checked
//! against a real Prometheus scraping a running `kgs-producer` and two
//! app servers (`kgs-app-server`): every expression parses, every dashboard target
//! returns data, and every `kgs_*` metric they name exists, so a metric
//! renamed in code without its dashboard or rule fails here.
//!
//! Needs the `prometheus` and `promtool` binaries (Debian package
//! `prometheus`; `.ci/run` installs it), or `KGS_PROMETHEUS_BIN` /
//! `KGS_PROMTOOL_BIN`. A missing Prometheus fails the test unless
//! `KGS_ALLOW_NO_PROMETHEUS=1`, which skips it with a message.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use kgs_tests::process::stop;
use kgs_tests::{
    free_addr, http_get, mongo_client, unique, wait_for, wait_healthy, AppServer, AppServerCmd,
    ProducerCmd, Signal,
};
use serde_json::Value;
use tokio::process::{Child, Command};

/// Bound of every wait for a process or a scrape.
const WAIT: Duration = Duration::from_secs(60);

/// Every `expr` of every dashboard panel and every alert rule evaluates in a
/// real Prometheus that scrapes the running pipeline; panel targets return
/// data, rules load and evaluate healthy, every referenced metric exists.
#[tokio::test(flavor = "multi_thread")]
async fn dashboards_and_alert_rules_evaluate_against_a_real_prometheus() -> Result<()> {
    let Some(tools) = PromTools::find()? else {
        return Ok(());
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("repo root")?
        .to_path_buf();
    let rules_file = repo.join("grafana/prometheus/kgs-alerts.yml");
    // The JSON under test is what grafana/generate.py (the source) writes.
    let generated = std::process::Command::new("python3")
        .arg(repo.join("grafana/generate.py"))
        .arg("--check")
        .output()
        .context("running python3 grafana/generate.py --check")?;
    ensure!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let panels = dashboard_targets(&repo.join("grafana/dashboards"))?;
    ensure!(!panels.is_empty(), "no dashboard targets found");

    // The rules file must be clean before anything runs.
    let check = std::process::Command::new(&tools.promtool)
        .args(["check", "rules"])
        .arg(&rules_file)
        .output()
        .context("running promtool check rules")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    ensure!(
        check.status.success() && !said.to_lowercase().contains("warning"),
        "promtool check rules {}: {said}",
        rules_file.display()
    );

    let dir = std::env::temp_dir().join(unique("kgs-observability"));
    std::fs::create_dir_all(&dir)?;
    let stack = Stack::start(&dir).await?;
    let prometheus = Prometheus::start(&tools, &dir, &rules_file, &stack).await?;

    // Keep the pipeline busy while Prometheus scrapes: both app servers hand
    // out keys, and none is handed out twice.
    let running = Arc::new(AtomicBool::new(true));
    let traffic = tokio::spawn(fetch_keys(stack.apps.clone(), Arc::clone(&running)));

    let result = check_everything(&prometheus, &panels, &rules_file).await;
    running.store(false, Ordering::Relaxed);
    let served = traffic.await.context("traffic task")??;
    stack.stop().await;
    drop(prometheus);
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("observability: logs kept in {}", dir.display());
    }
    result?;
    ensure!(served > 0, "the app servers handed out no keys");
    Ok(())
}

/// The three checks, against the running Prometheus.
async fn check_everything(
    prometheus: &Prometheus,
    panels: &[PanelTarget],
    rules_file: &Path,
) -> Result<()> {
    let mut problems = Vec::new();

    // 1. Every alert rule of the file is loaded, parses, and evaluates healthy.
    let rule_count = std::fs::read_to_string(rules_file)?
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("- alert:") || l.starts_with("- record:")
        })
        .count();
    let rules = wait_for("every rule evaluated once", WAIT, || async {
        let rules = prometheus.rules().await?;
        Ok((rules.len() == rule_count && rules.iter().all(|r| r.evaluated)).then_some(rules))
    })
    .await?;
    for rule in &rules {
        if rule.health != "ok" {
            problems.push(format!("rule {}: health {}", rule.name, rule.health));
        }
        if let Err(e) = prometheus.query(&rule.query).await {
            problems.push(format!("rule {}: {e:#}", rule.name));
        }
    }
    // The rules mean what they say on this pipeline: one producer leads, no
    // bad message was sent, and a 1,296-key pool burning ~40 keys/s runs out
    // in well under a week. (Alerts with `for:` are not waited for; the
    // conditions are evaluated directly.)
    for (name, should_fire) in [
        ("KgsNoActiveProducer", false),
        ("KgsBadMessages", false),
        ("KgsUnverifiedBatches", false),
        ("KgsPoolNearlyExhausted", true),
    ] {
        let Some(rule) = rules.iter().find(|r| r.name == name) else {
            problems.push(format!("rule {name} is missing"));
            continue;
        };
        let fired = wait_for(&format!("{name} condition"), WAIT, || async {
            let series = prometheus.query(&rule.query).await?;
            Ok(((series > 0) == should_fire).then_some(true))
        })
        .await
        .unwrap_or(false);
        if !fired {
            let state = if should_fire { "hold" } else { "stay empty" };
            problems.push(format!("rule {name}: condition did not {state}"));
        }
    }
    let one_leader =
        "count(kgs_producer_lease_leader) == 2 and sum(kgs_producer_lease_leader) == 1";
    if let Err(e) = wait_for("one leader among the two producers", WAIT, || async {
        Ok((prometheus.query(one_leader).await? == 1).then_some(()))
    })
    .await
    {
        problems.push(format!("{e:#}"));
    }

    // 2. Every panel target parses and returns data while the pipeline runs
    //    (rates need two scrapes, so retry until a deadline).
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut pending: Vec<&PanelTarget> = panels.iter().collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for target in pending {
            match prometheus.query(&target.expr).await {
                Ok(series) if series > 0 => {}
                Ok(_) => still.push(target),
                Err(e) => problems.push(format!("{target}: {e:#}")),
            }
        }
        pending = still;
        if pending.is_empty() || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    problems.extend(pending.iter().map(|t| format!("{t}: no data")));

    // 3. Every kgs_* metric named anywhere exists, so a rename cannot hide
    //    behind `or vector(0)`, `absent()` or a comparison that is empty anyway.
    let mut names = BTreeSet::new();
    for expr in panels
        .iter()
        .map(|p| p.expr.as_str())
        .chain(rules.iter().map(|r| r.query.as_str()))
    {
        names.extend(metric_names(expr));
    }
    ensure!(!names.is_empty(), "no kgs_* metric names found");
    for name in &names {
        let query = format!("count({{__name__=~\"{name}(_bucket)?\"}})");
        match prometheus.query(&query).await {
            Ok(n) if n > 0 => {}
            Ok(_) => problems.push(format!(
                "metric {name} is named by a dashboard or rule but not exported"
            )),
            Err(e) => problems.push(format!("metric {name}: {e:#}")),
        }
    }

    // Exported but shown nowhere: worth knowing, not a failure.
    let exported = prometheus.metric_names().await?;
    let unused: Vec<&String> = exported
        .iter()
        .filter(|m| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| m.strip_suffix(s))
                .unwrap_or(m);
            !names.contains(m.as_str()) && !names.iter().any(|n| n.starts_with(base))
        })
        .collect();
    if !unused.is_empty() {
        eprintln!("observability: exported but in no dashboard or rule: {unused:?}");
    }

    ensure!(
        problems.is_empty(),
        "{} problem(s) with the dashboards and rules:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
    Ok(())
}

/// The `prometheus` and `promtool` binaries.
struct PromTools {
    prometheus: PathBuf,
    promtool: PathBuf,
}

impl PromTools {
    /// Finds both binaries; `None` (skip) only if they are missing and
    /// `KGS_ALLOW_NO_PROMETHEUS=1`.
    fn find() -> Result<Option<Self>> {
        let found = |var: &str, name: &str| {
            std::env::var_os(var).map(PathBuf::from).or_else(|| {
                std::env::var_os("PATH").and_then(|path| {
                    std::env::split_paths(&path)
                        .map(|d| d.join(name))
                        .find(|p| p.is_file())
                })
            })
        };
        match (
            found("KGS_PROMETHEUS_BIN", "prometheus"),
            found("KGS_PROMTOOL_BIN", "promtool"),
        ) {
            (Some(prometheus), Some(promtool)) => Ok(Some(Self {
                prometheus,
                promtool,
            })),
            _ if std::env::var("KGS_ALLOW_NO_PROMETHEUS").as_deref() == Ok("1") => {
                eprintln!(
                    "observability: SKIPPED: prometheus/promtool not found and \
                     KGS_ALLOW_NO_PROMETHEUS=1; the dashboards and rules were not checked"
                );
                Ok(None)
            }
            _ => bail!(
                "prometheus and promtool are needed (apt-get install prometheus, or set \
                 KGS_PROMETHEUS_BIN/KGS_PROMTOOL_BIN); KGS_ALLOW_NO_PROMETHEUS=1 skips this test"
            ),
        }
    }
}

/// One `expr` of a dashboard panel.
struct PanelTarget {
    dashboard: String,
    panel: String,
    expr: String,
}

impl std::fmt::Display for PanelTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} / {:?}: {}", self.dashboard, self.panel, self.expr)
    }
}

/// Every target `expr` of every panel (rows included) of every dashboard.
fn dashboard_targets(dir: &Path) -> Result<Vec<PanelTarget>> {
    fn walk(dashboard: &str, panels: &[Value], out: &mut Vec<PanelTarget>) {
        for p in panels {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push(PanelTarget {
                        dashboard: dashboard.to_owned(),
                        panel: title.clone(),
                        expr: expr.to_owned(),
                    });
                }
            }
            if let Some(inner) = p["panels"].as_array() {
                walk(dashboard, inner, out);
            }
        }
    }
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| Ok(e?.path()))
        .collect::<Result<_>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "json"));
    files.sort();
    ensure!(!files.is_empty(), "no dashboards in {}", dir.display());
    for file in files {
        let d: Value = serde_json::from_slice(&std::fs::read(&file)?)
            .with_context(|| format!("parsing {}", file.display()))?;
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        walk(&name, d["panels"].as_array().map_or(&[], |v| v), &mut out);
    }
    Ok(out)
}

/// Every `kgs_[a-z_]+` name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("kgs_") {
        // Only at a word start (not e.g. inside `my_kgs_x`).
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..len].to_owned());
        }
        rest = &tail[len..];
    }
    names
}

/// A pool, two producers (one leads, one stands by) and two example app
/// servers, each process on its own loopback port.
struct Stack {
    db_name: String,
    producers: Vec<String>,
    producer_children: Vec<Child>,
    apps: Vec<String>,
    app_servers: Vec<AppServer>,
}

impl Stack {
    async fn start(dir: &Path) -> Result<Self> {
        let db_name = unique("kgs-obs");
        let pool = unique("obs");
        let group = unique("g");
        let log = |name: &str| -> Result<Stdio> {
            Ok(std::fs::File::create(dir.join(format!("{name}.log")))?.into())
        };
        let producer = || {
            Ok::<_, anyhow::Error>(
                ProducerCmd::new(&db_name, &pool)?
                    .env("KGS_GROUP", &group)
                    .env("KGS_TARGET_SIZE", "1296"),
            )
        };
        // 36^2 = 1296 keys: small enough for the slow MongoDB-wire test server.
        producer()?
            .init(2, 2)
            .args(["--alphabet", "0123456789abcdefghijklmnopqrstuvwxyz"])
            .success()
            .await?;
        let mut producers = Vec::new();
        let mut producer_children = Vec::new();
        for i in 0..2 {
            let addr = free_addr()?;
            let child = producer()?
                .run(20, 3)
                .env("KGS_HTTP_ADDR", &addr)
                .env("KGS_INSTANCE_ID", format!("producer{i}"))
                .log_to(&dir.join(format!("producer{i}.log")))?
                .spawn()?;
            producers.push(addr);
            producer_children.push(child);
        }

        let mut apps = Vec::new();
        let mut app_servers = Vec::new();
        for i in 0..2 {
            let app = AppServerCmd::new(&db_name, &pool)?
                .group(&group)
                .instance(&format!("app{i}"))
                .watermarks(20, 40)
                .stdout(Stdio::null())
                .stderr(log(&format!("app{i}"))?)
                .start()
                .await?;
            apps.push(app.addr().to_owned());
            app_servers.push(app);
        }
        for addr in &producers {
            wait_healthy(addr, "/healthz", WAIT).await?;
        }
        Ok(Self {
            db_name,
            producers,
            producer_children,
            apps,
            app_servers,
        })
    }

    /// SIGTERM to every process (app servers first, so their keys go back),
    /// then drops the pool's database.
    async fn stop(self) {
        for app in self.app_servers {
            let _ = app.stop(Signal::Term).await;
        }
        for mut child in self.producer_children {
            let _ = stop(&mut child, Signal::Term, WAIT).await;
        }
        if let Ok(client) = mongo_client().await {
            let _ = client.database(&self.db_name).drop().await;
        }
    }
}

/// Fetches keys from every app server in turn until `running` is cleared;
/// fails on a key handed out twice, returns how many were handed out.
async fn fetch_keys(apps: Vec<String>, running: Arc<AtomicBool>) -> Result<usize> {
    let mut seen = HashSet::new();
    while running.load(Ordering::Relaxed) {
        for addr in &apps {
            match http_get(addr, "/keys").await? {
                (200, key) => ensure!(seen.insert(key.clone()), "key {key} handed out twice"),
                (503, _) => {}
                (status, body) => bail!("GET {addr}/keys: {status} {body}"),
            }
        }
        // About 40 keys/s: a 1,296-key pool lasts the whole test.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(seen.len())
}

/// A running Prometheus on a loopback port, scraping the stack every second.
struct Prometheus {
    addr: String,
    _child: Child,
}

/// One loaded rule, as `/api/v1/rules` reports it.
struct Rule {
    name: String,
    query: String,
    health: String,
    evaluated: bool,
}

impl Prometheus {
    async fn start(tools: &PromTools, dir: &Path, rules: &Path, stack: &Stack) -> Result<Self> {
        let addr = free_addr()?;
        let quoted = |addrs: &[&String]| {
            addrs
                .iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - '{}'\n\
             scrape_configs:\n\
             \x20 - job_name: kgs-producer\n    static_configs:\n      - targets: [{}]\n\
             \x20 - job_name: kgs-app-server\n    static_configs:\n      - targets: [{}]\n",
            rules.display(),
            quoted(&stack.producers.iter().collect::<Vec<_>>()),
            quoted(&stack.apps.iter().collect::<Vec<_>>()),
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config)?;
        let check = std::process::Command::new(&tools.promtool)
            .args(["check", "config"])
            .arg(&config_file)
            .output()?;
        ensure!(
            check.status.success(),
            "promtool check config: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new(&tools.prometheus)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(
                dir.join("prometheus.log"),
            )?))
            .kill_on_drop(true)
            .spawn()
            .context("spawning prometheus")?;
        let prometheus = Self {
            addr,
            _child: child,
        };
        wait_healthy(&prometheus.addr, "/-/ready", WAIT).await?;
        let expected = stack.producers.len() + stack.apps.len();
        wait_for("every scrape target up", WAIT, || async {
            let v = prometheus.api("/api/v1/targets?state=active").await?;
            let targets = v["activeTargets"].as_array().cloned().unwrap_or_default();
            Ok(
                (targets.len() == expected && targets.iter().all(|t| t["health"] == "up"))
                    .then_some(()),
            )
        })
        .await?;
        Ok(prometheus)
    }

    /// `data` of a successful API call, or the API's error.
    async fn api(&self, path_and_query: &str) -> Result<Value> {
        let (status, body) = http_get(&self.addr, path_and_query).await?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("prometheus answered {status}: {body}"))?;
        ensure!(
            v["status"] == "success",
            "{} {}",
            v["errorType"].as_str().unwrap_or("error"),
            v["error"].as_str().unwrap_or(&body)
        );
        Ok(v["data"].clone())
    }

    /// Evaluates an instant query; the number of series (or 1 for a scalar).
    async fn query(&self, expr: &str) -> Result<usize> {
        let data = self
            .api(&format!(
                "/api/v1/query?query={}",
                kgs_tests::http::percent_encode(expr)
            ))
            .await?;
        Ok(match data["resultType"].as_str() {
            Some("vector") | Some("matrix") => data["result"].as_array().map_or(0, Vec::len),
            _ => 1,
        })
    }

    /// Every rule of every loaded group.
    async fn rules(&self) -> Result<Vec<Rule>> {
        let data = self.api("/api/v1/rules").await?;
        let mut rules = Vec::new();
        for group in data["groups"].as_array().into_iter().flatten() {
            for r in group["rules"].as_array().into_iter().flatten() {
                rules.push(Rule {
                    name: r["name"].as_str().unwrap_or("?").to_owned(),
                    query: r["query"].as_str().unwrap_or_default().to_owned(),
                    health: r["health"].as_str().unwrap_or("?").to_owned(),
                    // Never-evaluated rules report the zero time.
                    evaluated: r["lastEvaluation"]
                        .as_str()
                        .is_some_and(|t| !t.starts_with("0001-")),
                });
            }
        }
        Ok(rules)
    }

    /// Every `kgs_*` metric name Prometheus has.
    async fn metric_names(&self) -> Result<BTreeSet<String>> {
        let data = self.api("/api/v1/label/__name__/values").await?;
        Ok(data
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|n| n.starts_with("kgs_"))
            .map(str::to_owned)
            .collect())
    }
}

/// Metric names are found at word starts only, `_bucket` kept.
#[test]
fn metric_names_are_extracted() {
    let names = metric_names(
        "histogram_quantile(0.5, sum by (le) (rate(kgs_producer_move_seconds_bucket[5m]))) \
         / kgs_consumer_paused or my_kgs_other",
    );
    let expected: BTreeSet<String> = ["kgs_consumer_paused", "kgs_producer_move_seconds_bucket"]
        .map(String::from)
        .into();
    assert_eq!(names, expected);
}

//! The processes of a chaos run: the chaos instance's Kafka broker and
//! MongoDB-wire server (driven through `scripts/servers.sh`), and the
//! restartable slots of producers and app servers, each incarnation with its
//! own instance id and log file.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kgs_tests::process::{send_signal, stop, Signal};
use kgs_tests::{AppServerCmd, ProducerCmd, Proxy};
use tokio::process::{Child, Command};

/// How long a SIGTERMed process may take before it is SIGKILLed (the
/// producer's shutdown deadline is 20 s, the consumer's return deadline 10 s).
const TERM_DEADLINE: Duration = Duration::from_secs(40);

/// Pool and pipeline sizes of a run.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Keys per batch (one Kafka message).
    pub batch_size: usize,
    /// App server buffer: resume fetching at this many keys...
    pub app_low: usize,
    /// ...pause at this many. A crash loses at most `app_high` plus the
    /// batch that crossed it.
    pub app_high: usize,
}

impl Tuning {
    /// Most keys one crashed app server can lose: its buffer pauses at the
    /// high watermark, after the batch that crossed it. Batches are not all
    /// `batch_size`: the producer's sizer grows them (up to 10 times) while
    /// consumers drain fast, so the bound is taken with the largest batch
    /// the instance claimed.
    pub fn loss_limit(&self, largest_batch: usize) -> usize {
        self.app_high + largest_batch.max(self.batch_size)
    }
}

/// The chaos instance of the local servers (own ports, data and logs).
#[derive(Debug, Clone)]
pub struct Servers {
    /// The repository (for `scripts/servers.sh`).
    pub root: PathBuf,
    /// `KGS_SERVERS_INSTANCE`.
    pub instance: String,
    /// Kafka listener port.
    pub kafka_port: u16,
    /// Kafka controller port.
    pub controller_port: u16,
    /// SecantusDB port.
    pub mongo_port: u16,
    /// Kafka listener port that advertises `kafka_proxy_port` (the app
    /// servers' way in, through [`Proxies::app_kafka`]).
    pub kafka_proxied_port: u16,
    /// Port of the app servers' Kafka proxy.
    pub kafka_proxy_port: u16,
    /// Where `servers.sh` output goes.
    pub log: PathBuf,
}

impl Servers {
    /// Kafka bootstrap servers of the instance.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.kafka_port)
    }

    /// MongoDB connection string of the instance.
    pub fn mongodb_uri(&self) -> String {
        format!(
            "mongodb://127.0.0.1:{}/?directConnection=true",
            self.mongo_port
        )
    }

    /// Runs `scripts/servers.sh <cmd> <which>` for this instance.
    pub async fn script(&self, cmd: &str, which: &str) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let status = Command::new(self.root.join("scripts/servers.sh"))
            .args([cmd, which])
            .env("KGS_SERVERS_INSTANCE", &self.instance)
            .env("KGS_KAFKA_PORT", self.kafka_port.to_string())
            .env(
                "KGS_KAFKA_CONTROLLER_PORT",
                self.controller_port.to_string(),
            )
            .env("KGS_MONGO_PORT", self.mongo_port.to_string())
            .env(
                "KGS_KAFKA_PROXIED_PORT",
                self.kafka_proxied_port.to_string(),
            )
            .env("KGS_KAFKA_PROXY_PORT", self.kafka_proxy_port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .await
            .context("running scripts/servers.sh")?;
        if !status.success() {
            bail!(
                "scripts/servers.sh {cmd} {which} failed ({status}), see {}",
                self.log.display()
            );
        }
        Ok(())
    }

    fn pid_file(&self, which: &str) -> PathBuf {
        let cache = std::env::var_os("KGS_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| self.root.join(".cache"));
        let state = cache.join("instances").join(&self.instance);
        match which {
            "kafka" => state.join("kafka/kafka.pid"),
            _ => state.join("secantus/secantus.pid"),
        }
    }

    /// Stops `which` (`kafka` or `mongo`): SIGKILL of its process if `hard`,
    /// else the script's graceful `down`. Its on-disk data is kept.
    pub async fn stop(&self, which: &str, hard: bool) -> Result<()> {
        if !hard {
            return self.script("down", which).await;
        }
        let pid = std::fs::read_to_string(self.pid_file(which))
            .with_context(|| format!("{which} is not running (no pid file)"))?;
        let pid: u32 = pid
            .trim()
            .parse()
            .with_context(|| format!("{which}'s pid file holds {pid:?}"))?;
        send_signal(pid, Signal::Kill)?;
        for _ in 0..200 {
            if !alive(pid) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("{which} (pid {pid}) survived SIGKILL for 10 s")
    }
}

/// The network between the processes and the servers, each path through
/// a loopback proxy of the run (`kgs_tests::proxy`) that a fault can slow
/// down or stall: each producer's own path to MongoDB, and one path for
/// every app server to Kafka. The checker and the hostile writer go direct.
#[derive(Debug)]
pub struct Proxies {
    /// Producer slot `i`'s MongoDB.
    pub producer_db: Vec<Proxy>,
    /// The app servers' Kafka (the broker's proxied listener).
    pub app_kafka: Proxy,
}

impl Proxies {
    /// Starts the proxies of `servers`.
    pub async fn start(servers: &Servers) -> Result<Self> {
        let mongo = SocketAddr::from((Ipv4Addr::LOCALHOST, servers.mongo_port));
        let mut producer_db = Vec::new();
        for _ in 0..2 {
            producer_db.push(Proxy::start(mongo).await?);
        }
        let kafka = SocketAddr::from((Ipv4Addr::LOCALHOST, servers.kafka_proxied_port));
        let app_kafka = Proxy::start_on(servers.kafka_proxy_port, kafka).await?;
        Ok(Self {
            producer_db,
            app_kafka,
        })
    }
}

/// Whether process `pid` exists (`kill -0`).
fn alive(pid: u32) -> bool {
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What runs in a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `kgs-producer run`.
    Producer,
    /// The app server (`kgs-app-server`).
    App,
}

/// One restartable process.
#[derive(Debug)]
pub struct Slot {
    /// What it runs.
    pub role: Role,
    /// Its HTTP port (metrics for producers, `/keys` for app servers).
    pub port: u16,
    /// Instance id of the current incarnation.
    pub instance: String,
    /// Incarnations started so far.
    pub generation: u32,
    /// The running process, if any.
    pub child: Option<Child>,
    /// Whether the run wants it running (the supervisor restarts it).
    pub wanted: bool,
    name: String,
}

/// Every process of the run and what happened to them.
#[derive(Debug)]
pub struct Cluster {
    /// The servers.
    pub servers: Servers,
    /// Database of the run.
    pub db: String,
    /// Pool of the run.
    pub pool: String,
    /// Pipeline sizes.
    pub tuning: Tuning,
    /// Producers (0, 1) then app servers (2..).
    pub slots: Vec<Slot>,
    /// App server incarnations whose buffered keys may be lost: SIGKILLed,
    /// or stopped without returning every key (they log it at ERROR).
    pub lossy: HashSet<String>,
    /// Exits nobody asked for: (instance, status).
    pub unexpected_exits: Vec<(String, String)>,
    /// The proxies every process reaches its servers through.
    pub proxies: Proxies,
    producer_bin: PathBuf,
    app_bin: PathBuf,
    run_dir: PathBuf,
}

impl Cluster {
    /// A cluster of 2 producer slots and `apps` app server slots, none started.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        servers: Servers,
        proxies: Proxies,
        db: String,
        pool: String,
        tuning: Tuning,
        apps: usize,
        base_port: u16,
        producer_bin: PathBuf,
        app_bin: PathBuf,
        run_dir: PathBuf,
    ) -> Self {
        let mut slots = Vec::new();
        for i in 0..2 + apps {
            let (role, name) = if i < 2 {
                (Role::Producer, format!("producer{i}"))
            } else {
                (Role::App, format!("app{}", i - 2))
            };
            slots.push(Slot {
                role,
                port: base_port + i as u16,
                instance: String::new(),
                generation: 0,
                child: None,
                wanted: false,
                name,
            });
        }
        Self {
            servers,
            db,
            pool,
            tuning,
            slots,
            lossy: HashSet::new(),
            unexpected_exits: Vec::new(),
            proxies,
            producer_bin,
            app_bin,
            run_dir,
        }
    }

    /// Log file of an incarnation.
    pub fn log_of(&self, instance: &str) -> PathBuf {
        self.run_dir.join(format!("{instance}.log"))
    }

    /// A `kgs-producer` command for this run's servers, database and pool
    /// (lease [`kgs_tests::producer::LEASE`]: a standby takes over 3 s after
    /// the leader's crash).
    pub fn producer_command(&self) -> ProducerCmd {
        ProducerCmd::with_binary(&self.producer_bin, &self.db, &self.pool)
            .servers(&self.servers.brokers(), &self.servers.mongodb_uri())
            // Restarts may happen while a server is down: wait it out.
            .env("KGS_CONNECT_TIMEOUT", "300s")
            // The pool holds a few batches' worth of keys and is topped up
            // while running, so generation runs under faults too.
            .env("KGS_TARGET_SIZE", (self.tuning.batch_size * 30).to_string())
            .env(
                "KGS_GENERATE_CHUNK",
                (self.tuning.batch_size * 10).to_string(),
            )
    }

    /// `kgs-producer init` of the run's pool: base62 keys of lengths 1 to
    /// 3 (62 + 3,844 + 238,328), so the run crosses from one length to the
    /// next under faults; 3 partitions; the default blocklist (the checker
    /// counts its positions out). Run again after the topic is deleted.
    pub fn init_command(&self) -> ProducerCmd {
        self.producer_command()
            .init(1, 3)
            .args(["--max-length", "3", "--blocklist", "default"])
    }

    /// Starts slot `i`'s next incarnation.
    pub fn start(&mut self, i: usize) -> Result<()> {
        let slot = &self.slots[i];
        let instance = format!("{}-{}", slot.name, slot.generation + 1);
        let log = std::fs::File::create(self.log_of(&instance))?;
        let addr = format!("127.0.0.1:{}", slot.port);
        let stdout = log.try_clone()?;
        let child = match slot.role {
            Role::Producer => {
                let mongodb_uri = format!(
                    "mongodb://{}/?directConnection=true",
                    self.proxies.producer_db[i].addr()
                );
                self.producer_command()
                    .env("KGS_MONGODB_URI", mongodb_uri)
                    .run(self.tuning.batch_size, 3)
                    .args(["--instance-id", &instance])
                    // By environment, which both names of the setting read
                    // (`KGS_HTTP_ADDR`, formerly `KGS_HTTP_LISTEN`).
                    .env("KGS_LOG", "info")
                    .env("KGS_HTTP_ADDR", &addr)
                    .env("KGS_HTTP_LISTEN", &addr)
                    .stdout(stdout)
                    .stderr(log)
                    .spawn()
            }
            // By flags (which override the fixture's environment), so the
            // command line of the app server is exercised too.
            Role::App => AppServerCmd::with_binary(&self.app_bin, &self.db, &self.pool, &addr)
                .servers(
                    &self.proxies.app_kafka.addr().to_string(),
                    &self.servers.mongodb_uri(),
                )
                .args(["--pool", &self.pool, "--http-addr", &addr])
                .args(["--instance-id", &instance])
                .args(["--low-watermark", &self.tuning.app_low.to_string()])
                .args(["--high-watermark", &self.tuning.app_high.to_string()])
                // The group notices a dead member within 6 s.
                .args(["--kafka-session-timeout", "6s"])
                .args(["--key-wait", "200ms"])
                .env("KGS_LOG", "info")
                .stdout(stdout)
                .stderr(log)
                .spawn(),
        }
        .with_context(|| format!("spawning {instance}"))?;
        let slot = &mut self.slots[i];
        slot.generation += 1;
        slot.instance = instance;
        slot.child = Some(child);
        slot.wanted = true;
        Ok(())
    }

    /// Whether slot `i` has a live process.
    pub fn running(&self, i: usize) -> bool {
        self.slots[i].child.is_some()
    }

    /// SIGKILLs slot `i` and reaps it. App server incarnations become lossy.
    pub async fn kill(&mut self, i: usize) -> Result<()> {
        let slot = &mut self.slots[i];
        slot.wanted = false;
        let Some(mut child) = slot.child.take() else {
            return Ok(());
        };
        child.start_kill()?;
        child.wait().await?;
        if slot.role == Role::App {
            self.lossy.insert(slot.instance.clone());
        }
        Ok(())
    }

    /// SIGTERMs slot `i` and waits for its exit (SIGKILL after the
    /// deadline). An app server that did not return every key becomes lossy.
    pub async fn terminate(&mut self, i: usize) -> Result<Option<ExitStatus>> {
        let slot = &mut self.slots[i];
        slot.wanted = false;
        let Some(mut child) = slot.child.take() else {
            return Ok(None);
        };
        let status = stop(&mut child, Signal::Term, TERM_DEADLINE).await?;
        if status.is_none() {
            child.start_kill()?;
            child.wait().await?;
        }
        let instance = slot.instance.clone();
        if slot.role == Role::App
            && (status.is_none_or(|s| !s.success()) || self.reported_loss(&instance))
        {
            self.lossy.insert(instance);
        }
        Ok(status)
    }

    /// Whether an app server said it could not return some keys (its
    /// shutdown deadline passed while a server was down).
    fn reported_loss(&self, instance: &str) -> bool {
        std::fs::read_to_string(self.log_of(instance))
            .is_ok_and(|log| log.contains("the claim stays open"))
    }

    /// Reaps processes that exited on their own, records them, and restarts
    /// every wanted slot that is not running.
    pub fn supervise(&mut self) -> Result<()> {
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if let Some(child) = slot.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    slot.child = None;
                    let instance = slot.instance.clone();
                    if status.code() == Some(2) {
                        bail!(
                            "{instance} refused its command line ({status}), see {}",
                            self.log_of(&instance).display()
                        );
                    }
                    eprintln!("chaos: {instance} exited on its own ({status}); restarting");
                    self.unexpected_exits
                        .push((instance.clone(), status.to_string()));
                    if self.slots[i].role == Role::App {
                        self.lossy.insert(instance);
                    }
                }
            }
            if self.slots[i].wanted && self.slots[i].child.is_none() {
                self.start(i)?;
            }
        }
        Ok(())
    }

    /// Kills every process still running (after a failure).
    pub async fn kill_all(&mut self) {
        for i in 0..self.slots.len() {
            let _ = self.kill(i).await;
        }
    }
}

/// `KGS_CACHE_DIR` or the repository's `.cache`.
pub fn run_dir(root: &Path, instance: &str, name: &str) -> Result<PathBuf> {
    let cache = std::env::var_os("KGS_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".cache"));
    let dir = cache
        .join("instances")
        .join(instance)
        .join("runs")
        .join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

//! `kgs-chaos`: a Jepsen-style test of the whole kgs pipeline. It runs the
//! chaos instance's Kafka broker and SecantusDB, two `kgs-producer run` (one
//! leads, one stands by) and three app servers (`kgs-app-server`) as separate
//! processes, with one client per app server requesting keys over HTTP and
//! recording every key. Faults are drawn from a seeded RNG (the seed is
//! printed; `--seed` replays the same sequence): SIGKILL and SIGTERM of
//! producers and app servers, stop/restart of the broker and of the database
//! (data kept), rebalances by adding/removing an app server, and a hostile
//! SIGSTOP of the active producer for longer than its lease (then SIGCONT,
//! so its in-flight writes land after the takeover), and a hostile
//! writer that puts well-formed forged batches on the pool topic (keys
//! already handed out, keys still in the pool, a real batch on another
//! partition), none of which may be handed out. Every process reaches its
//! servers through a loopback proxy of the run (`kgs_tests::proxy`), so
//! the network fails too: the active producer's path to MongoDB stalled
//! for longer than its lease (its requests held, then delivered late) or
//! slowed down, and the app servers' path to Kafka stalled (longer than
//! their session timeout, at times). And the pool topic is deleted and
//! created again by `kgs-producer init`, with batches in flight. After each
//! fault the run waits until keys of a batch claimed after the fault reach a
//! client (the recovery time). At the end everything is stopped cleanly and
//! the checker (`check.rs`) proves the invariants; the exit code says
//! whether all held.
//!
//! # Layout
//! - `main.rs`: flags, set-up, fault loop, clients, summary.
//! - `cluster.rs`: servers and restartable processes.
//! - `check.rs`: the invariants over the final state.

mod check;
mod cluster;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bson::doc;
use chrono::{DateTime, Utc};
use clap::Parser;
use kgs_schemas::docs::{ClaimDoc, UsedKeyDoc, BATCHES, CLAIMS, POOLS};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

use kgs_tests::app_server::get_key;
use kgs_tests::env::{workspace_binary, APP_SERVER_BIN};
use kgs_tests::process::{send_signal, Signal};
use kgs_tests::Mode;

use crate::cluster::{Cluster, Servers, Tuning};

/// Chaos test of the whole kgs pipeline (see the module docs).
#[derive(Debug, Parser)]
#[command(name = "kgs-chaos")]
struct Args {
    /// How long faults are injected, e.g. `90s`, `10m`.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    duration: Duration,
    /// RNG seed of the fault sequence [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// Longest allowed time from the end of a fault until keys of a batch
    /// claimed after it reach a client.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    recovery_bound: Duration,
    /// Keys per second requested by all clients together.
    #[arg(long, default_value_t = 90)]
    rate: u32,
    /// Server instance of `scripts/servers.sh` (own data, logs and ports).
    #[arg(long, default_value = "chaos")]
    instance: String,
    /// Kafka port of the instance.
    #[arg(long, default_value_t = 19092)]
    kafka_port: u16,
    /// Kafka controller port of the instance.
    #[arg(long, default_value_t = 19093)]
    controller_port: u16,
    /// SecantusDB port of the instance.
    #[arg(long, default_value_t = 27117)]
    mongo_port: u16,
    /// Kafka listener port that the app servers reach through their proxy.
    #[arg(long, default_value_t = 19094)]
    kafka_proxied_port: u16,
    /// Port of the app servers' Kafka proxy (that listener's advertised port).
    #[arg(long, default_value_t = 19095)]
    kafka_proxy_port: u16,
    /// First HTTP port of the processes (2 producers, 4 app servers).
    #[arg(long, default_value_t = 19180)]
    base_port: u16,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "ms" => Ok(Duration::from_millis(n)),
        _ => Err(format!("bad duration unit in {s:?} (s, m or ms)")),
    }
}

/// The app server slots: three always, a fourth added and removed for rebalances.
const APPS: usize = 4;
const BASE_APPS: usize = 3;

/// Kinds of fault, drawn from a shuffled deck so a run of N faults covers
/// every kind once before any repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillActiveProducer,
    KillStandbyProducer,
    TermProducer,
    KillApp,
    TermApp,
    KafkaRestart,
    MongoRestart,
    Rebalance,
    HostileWriter,
    PauseActiveProducer,
    StallProducerDb,
    SlowProducerDb,
    StallAppKafka,
    RecreateTopic,
    AddBlockedWord,
}

const DECK: [Fault; 15] = [
    Fault::KillActiveProducer,
    Fault::KillStandbyProducer,
    Fault::TermProducer,
    Fault::KillApp,
    Fault::TermApp,
    Fault::KafkaRestart,
    Fault::MongoRestart,
    Fault::Rebalance,
    Fault::HostileWriter,
    Fault::PauseActiveProducer,
    Fault::StallProducerDb,
    Fault::SlowProducerDb,
    Fault::StallAppKafka,
    Fault::RecreateTopic,
    Fault::AddBlockedWord,
];

/// One injected fault.
#[derive(Debug)]
struct Injected {
    what: String,
    kind: &'static str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    recovery: Option<Duration>,
}

/// A key a client received.
#[derive(Debug, Clone)]
struct Received {
    key: String,
    at: DateTime<Utc>,
}

/// What the clients share.
#[derive(Debug, Default)]
struct Clients {
    received: Mutex<Vec<Received>>,
    stop: AtomicBool,
    unavailable: AtomicU64,
    errors: AtomicU64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Ctrl-C drops the run, and with it every child (`kill_on_drop`).
    let result = tokio::select! {
        r = run(args) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kgs-chaos: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<bool> {
    let seed = args.seed.unwrap_or_else(rand::random);
    println!(
        "kgs-chaos: seed {seed} (replay with --seed {seed}), faults for {:?}",
        args.duration
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_owned();
    // Not from the seed: a replay must not reuse the first run's pool and topic.
    let name = format!("chaos-{:08x}", rand::random::<u32>());
    let run_dir = cluster::run_dir(&root, &args.instance, &name)?;
    println!("kgs-chaos: pool {name}, logs in {}", run_dir.display());
    let servers = Servers {
        root: root.clone(),
        instance: args.instance.clone(),
        kafka_port: args.kafka_port,
        controller_port: args.controller_port,
        mongo_port: args.mongo_port,
        kafka_proxied_port: args.kafka_proxied_port,
        kafka_proxy_port: args.kafka_proxy_port,
        log: run_dir.join("servers.log"),
    };
    servers.script("up", "all").await?;
    if tokio::net::TcpStream::connect(("127.0.0.1", args.kafka_proxied_port))
        .await
        .is_err()
    {
        // Started earlier without the proxied listener: configure it now.
        println!("kgs-chaos: restarting the instance's Kafka with its proxied listener");
        servers.script("down", "kafka").await?;
        servers.script("up", "kafka").await?;
    }
    let proxies = cluster::Proxies::start(&servers).await?;
    let tuning = Tuning {
        batch_size: 100,
        app_low: 50,
        app_high: 150,
    };
    let mut cluster = Cluster::new(
        servers.clone(),
        proxies,
        name.clone(),
        name.clone(),
        tuning.clone(),
        APPS,
        args.base_port,
        workspace_binary("kgs-producer")?,
        workspace_binary(APP_SERVER_BIN)?,
        run_dir,
    );
    let mongo = mongodb::Client::with_uri_str(servers.mongodb_uri()).await?;
    let db = mongo.database(&name);

    let out = cluster.init_command().output().await?;
    ensure!(
        out.status.success(),
        "kgs-producer init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..2 + BASE_APPS {
        cluster.start(i)?;
    }

    let clients = Arc::new(Clients::default());
    let per_client = Duration::from_secs_f64(BASE_APPS as f64 / f64::from(args.rate.max(1)));
    let mut tasks = Vec::new();
    for slot in 0..APPS {
        let addr = format!("127.0.0.1:{}", cluster.slots[2 + slot].port);
        tasks.push(tokio::spawn(client(addr, per_client, Arc::clone(&clients))));
    }

    let result = chaos(&args, &mut rng, &mut cluster, &db, &clients).await;
    let faults = match result {
        Ok(f) => f,
        Err(e) => {
            cluster.kill_all().await;
            return Err(e);
        }
    };

    // Stop cleanly: clients first (no request in flight), then the app
    // servers (they return their keys), then wait for the producer to put
    // the returned keys back, then the producers.
    clients.stop.store(true, Ordering::Release);
    for t in tasks {
        t.await?;
    }
    for i in 2..2 + APPS {
        cluster.terminate(i).await?;
    }
    println!("kgs-chaos: app servers stopped; waiting for the producer to finish returns");
    let settle = Instant::now();
    loop {
        cluster.supervise()?;
        if settled(&db, &name).await.unwrap_or(false) {
            break;
        }
        if settle.elapsed() > Duration::from_secs(180) {
            eprintln!("kgs-chaos: returns or batches still unfinished after 180 s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for i in 0..2 {
        let status = cluster.terminate(i).await?;
        if !status.is_some_and(|s| s.success()) {
            cluster.unexpected_exits.push((
                cluster.slots[i].instance.clone(),
                format!("{status:?} after SIGTERM"),
            ));
        }
    }

    let received: Vec<Received> = clients.received.lock().unwrap().clone();
    let keys: Vec<String> = received.iter().map(|r| r.key.clone()).collect();
    let (mut verdicts, fig) = check::check(
        &db,
        &name,
        &servers.brokers(),
        &keys,
        &cluster.lossy,
        &tuning,
    )
    .await?;

    // (6) recovery after every fault, and the longest outage.
    let late: Vec<String> = faults
        .iter()
        .filter(|f| f.recovery.is_none_or(|r| r > args.recovery_bound))
        .map(|f| {
            format!(
                "{} at {} (done {}): recovery {:?}",
                f.what,
                f.start.format("%T"),
                f.end.format("%T"),
                f.recovery
            )
        })
        .collect();
    verdicts.push(check::Verdict {
        name: "6. keys flowed again after every fault within the bound",
        failure: (!late.is_empty()).then(|| late.join("; ")),
    });
    let mut times: Vec<DateTime<Utc>> = received.iter().map(|r| r.at).collect();
    times.sort();
    let (longest, longest_at) = times
        .windows(2)
        .map(|w| (w[1] - w[0], w[0]))
        .max()
        .map(|(d, at)| (d.to_std().unwrap_or_default(), Some(at)))
        .unwrap_or_default();

    // Summary.
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &faults {
        *by_kind.entry(f.kind).or_default() += 1;
    }
    let max_recovery = faults
        .iter()
        .filter_map(|f| f.recovery)
        .max()
        .unwrap_or_default();
    println!();
    println!(
        "kgs-chaos summary (seed {seed}, {:?} of faults)",
        args.duration
    );
    println!(
        "  keys handed out      {} ({} distinct)",
        fig.handed_out,
        fig.handed_out - fig.duplicates
    );
    println!(
        "  503 / errors         {} / {}",
        clients.unavailable.load(Ordering::Relaxed),
        clients.errors.load(Ordering::Relaxed)
    );
    println!("  faults               {}", faults.len());
    for (kind, n) in &by_kind {
        println!("    {kind:<34} {n}");
    }
    println!("  duplicates           {}", fig.duplicates);
    println!(
        "  lost keys            {} (limit {} = {} crashed app server incarnations x (high watermark {} + largest batch claimed))",
        fig.lost,
        fig.loss_limit,
        fig.lossy_instances,
        tuning.app_high
    );
    println!("  returned keys        {}", fig.returned);
    println!(
        "  batch sizes claimed  {}..={} keys",
        fig.batch_sizes.0, fig.batch_sizes.1
    );
    println!(
        "  generated            {} = {} in keys + {} in used_keys + {} blocked; {} batches in the topic ({} forged ones refused), {} keys pending there",
        fig.generated, fig.in_keys, fig.in_used, fig.blocked, fig.batches, fig.forged, fig.pending
    );
    println!(
        "  lengths              {}; blocklist words added {}, keys swept out of keys {}, handed out before their word {}",
        fig.lengths, fig.words_added, fig.blocklist_removed, fig.blocklist_handed_out
    );
    println!(
        "  longest outage       {:.1} s{} (no key received by any client)",
        longest.as_secs_f64(),
        longest_at
            .map(|t| format!(" from {}", t.format("%T")))
            .unwrap_or_default()
    );
    println!(
        "  slowest recovery     {:.1} s (fault end to first key of a batch claimed after it; bound {:?})",
        max_recovery.as_secs_f64(),
        args.recovery_bound
    );
    if !cluster.unexpected_exits.is_empty() {
        println!("  unexpected exits     {:?}", cluster.unexpected_exits);
    }
    let mut ok = true;
    for v in &verdicts {
        match &v.failure {
            None => println!("  PASS {}", v.name),
            Some(why) => {
                ok = false;
                println!("  FAIL {}: {why}", v.name);
            }
        }
    }
    println!(
        "kgs-chaos: {}",
        if ok { "all checks passed" } else { "FAILED" }
    );
    if ok {
        // The run's database is only evidence when something failed.
        let _ = db.drop().await;
    }
    Ok(ok)
}

/// The fault loop: waits for first keys, then injects faults until the
/// duration is over, waiting for recovery after each.
async fn chaos(
    args: &Args,
    rng: &mut StdRng,
    cluster: &mut Cluster,
    db: &mongodb::Database,
    clients: &Clients,
) -> Result<Vec<Injected>> {
    let started = Utc::now();
    let first = wait_recovered(cluster, db, clients, started, Duration::from_secs(180)).await?;
    let Some(first) = first else {
        bail!("no key reached a client within 180 s of the start; see the logs");
    };
    println!(
        "kgs-chaos: first keys after {:.1} s; injecting faults",
        first.as_secs_f64()
    );
    let until = Instant::now() + args.duration;
    let mut deck = Vec::new();
    let mut faults = Vec::new();
    while Instant::now() < until {
        // A pause of 2-8 s between faults, supervising meanwhile.
        let pause = Duration::from_millis(rng.random_range(2_000..8_000));
        supervised_sleep(cluster, pause).await?;
        if deck.is_empty() {
            deck = DECK.to_vec();
            deck.shuffle(rng);
        }
        let fault = deck.pop().expect("refilled");
        let start = Utc::now();
        let (what, kind) = inject(fault, rng, cluster, db).await?;
        let end = Utc::now();
        let recovery = wait_recovered(cluster, db, clients, end, args.recovery_bound).await?;
        println!(
            "kgs-chaos: {} {what}: recovered in {}",
            start.format("%T"),
            recovery.map_or("—".to_owned(), |r| format!("{:.1} s", r.as_secs_f64()))
        );
        faults.push(Injected {
            what,
            kind,
            start,
            end,
            recovery,
        });
    }
    Ok(faults)
}

/// Sleeps `d`, restarting crashed processes meanwhile.
async fn supervised_sleep(cluster: &mut Cluster, d: Duration) -> Result<()> {
    let until = Instant::now() + d;
    loop {
        cluster.supervise()?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        tokio::time::sleep(left.min(Duration::from_millis(250))).await;
    }
}

/// Injects one fault; returns its description and kind.
async fn inject(
    fault: Fault,
    rng: &mut StdRng,
    cluster: &mut Cluster,
    db: &mongodb::Database,
) -> Result<(String, &'static str)> {
    let apps: Vec<usize> = (2..2 + APPS).filter(|i| cluster.running(*i)).collect();
    let restart_delay = Duration::from_millis(rng.random_range(0..3_000));
    Ok(match fault {
        Fault::KillActiveProducer | Fault::KillStandbyProducer => {
            let leader = leader_slot(cluster, db).await;
            let active = fault == Fault::KillActiveProducer;
            let i = match leader {
                Some(l) if active => l,
                Some(l) => 1 - l,
                None => rng.random_range(0..2),
            };
            let instance = cluster.slots[i].instance.clone();
            cluster.kill(i).await?;
            tokio::time::sleep(restart_delay).await;
            cluster.start(i)?;
            let kind = if active {
                "SIGKILL active producer"
            } else {
                "SIGKILL standby producer"
            };
            (format!("{kind} {instance}"), kind)
        }
        Fault::TermProducer => {
            let i = rng.random_range(0..2);
            let instance = cluster.slots[i].instance.clone();
            let status = cluster.terminate(i).await?;
            tokio::time::sleep(restart_delay).await;
            cluster.start(i)?;
            (
                format!("SIGTERM producer {instance} (exit {status:?})"),
                "SIGTERM producer",
            )
        }
        Fault::KillApp => {
            let i = *apps.choose(rng).context("no app server running")?;
            let instance = cluster.slots[i].instance.clone();
            cluster.kill(i).await?;
            tokio::time::sleep(restart_delay).await;
            cluster.start(i)?;
            (
                format!("SIGKILL app server {instance}"),
                "SIGKILL app server",
            )
        }
        Fault::TermApp => {
            let i = *apps.choose(rng).context("no app server running")?;
            let instance = cluster.slots[i].instance.clone();
            let status = cluster.terminate(i).await?;
            tokio::time::sleep(restart_delay).await;
            cluster.start(i)?;
            (
                format!("SIGTERM app server {instance} (exit {status:?})"),
                "SIGTERM app server",
            )
        }
        Fault::KafkaRestart | Fault::MongoRestart => {
            let (which, label) = if fault == Fault::KafkaRestart {
                ("kafka", "Kafka broker")
            } else {
                ("mongo", "SecantusDB")
            };
            let hard = rng.random_bool(0.5);
            let down_for = Duration::from_millis(rng.random_range(1_000..10_000));
            cluster.servers.stop(which, hard).await?;
            supervised_sleep(cluster, down_for).await?;
            cluster.servers.script("up", which).await?;
            cluster.supervise()?;
            let kind = if fault == Fault::KafkaRestart {
                "Kafka broker stop+restart"
            } else {
                "SecantusDB stop+restart"
            };
            (
                format!(
                    "{label} {} for {:.1} s, restarted",
                    if hard {
                        "SIGKILLed"
                    } else {
                        "stopped (SIGTERM)"
                    },
                    down_for.as_secs_f64()
                ),
                kind,
            )
        }
        Fault::PauseActiveProducer => {
            // Longer than the 3 s lease: the standby takes over meanwhile,
            // and every write the paused leader had in hand lands late.
            let i = match leader_slot(cluster, db).await {
                Some(l) => l,
                None => rng.random_range(0..2),
            };
            let instance = cluster.slots[i].instance.clone();
            let pid = cluster.slots[i]
                .child
                .as_ref()
                .and_then(|c| c.id())
                .context("producer not running")?;
            let paused_for = Duration::from_millis(rng.random_range(4_000..9_000));
            send_signal(pid, Signal::Stop)?;
            tokio::time::sleep(paused_for).await;
            send_signal(pid, Signal::Cont)?;
            (
                format!(
                    "SIGSTOP active producer {instance} for {:.1} s, then SIGCONT",
                    paused_for.as_secs_f64()
                ),
                "SIGSTOP active producer",
            )
        }
        Fault::StallProducerDb | Fault::SlowProducerDb => {
            // The producer keeps running: its lease runs out by its own
            // clock while its requests sit in the network, the standby takes
            // over, and whatever it had sent lands after that.
            let i = match leader_slot(cluster, db).await {
                Some(l) => l,
                None => rng.random_range(0..2),
            };
            let instance = cluster.slots[i].instance.clone();
            let proxy = &cluster.proxies.producer_db[i];
            let (mode, lasting, what, kind) = if fault == Fault::StallProducerDb {
                let d = Duration::from_millis(rng.random_range(4_000..9_000));
                (
                    Mode::Stall,
                    d,
                    format!(
                        "network of producer {instance} to MongoDB stalled for {:.1} s (> lease), then delivered",
                        d.as_secs_f64()
                    ),
                    "stalled producer-MongoDB network",
                )
            } else {
                let delay = Duration::from_millis(rng.random_range(50..400));
                let d = Duration::from_millis(rng.random_range(5_000..15_000));
                (
                    Mode::Pass { delay },
                    d,
                    format!(
                        "network of producer {instance} to MongoDB delayed {} ms each way for {:.1} s",
                        delay.as_millis(),
                        d.as_secs_f64()
                    ),
                    "slow producer-MongoDB network",
                )
            };
            proxy.set(mode);
            supervised_sleep(cluster, lasting).await?;
            cluster.proxies.producer_db[i].set(Mode::OPEN);
            (what, kind)
        }
        Fault::StallAppKafka => {
            // Past the 6 s session timeout at times: the group drops the
            // app servers, their commits fail and their claims are ended.
            let d = Duration::from_millis(rng.random_range(2_000..10_000));
            cluster.proxies.app_kafka.set(Mode::Stall);
            supervised_sleep(cluster, d).await?;
            cluster.proxies.app_kafka.set(Mode::OPEN);
            (
                format!(
                    "network of the app servers to Kafka stalled for {:.1} s, then delivered",
                    d.as_secs_f64()
                ),
                "stalled app servers-Kafka network",
            )
        }
        Fault::RecreateTopic => {
            let pending = recreate_topic(cluster, db).await?;
            (
                format!("pool topic deleted and created again by init ({pending})"),
                "topic deleted + re-created",
            )
        }
        Fault::AddBlockedWord => {
            // A word of two letters: it matches keys of every length but
            // the first, those generated before (the leader's sweep takes
            // them out of `keys`) and after (generation skips them).
            let word: String = (0..2)
                .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
                .collect();
            let file = std::env::temp_dir().join(format!("{}-word-{word}.txt", cluster.pool));
            std::fs::write(&file, format!("{word}\n"))?;
            let out = cluster
                .producer_command()
                .args(["blocklist-add", "--blocklist", &file.to_string_lossy()])
                .output()
                .await?;
            ensure!(
                out.status.success(),
                "kgs-producer blocklist-add {word} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            (
                format!(
                    "word {word:?} added to the blocklist: {}",
                    String::from_utf8_lossy(&out.stdout).trim()
                ),
                "blocklist word added",
            )
        }
        Fault::HostileWriter => {
            let forged = hostile_writer(rng, cluster, db).await?;
            (
                format!("hostile writer: {forged} forged batches on the pool topic"),
                "hostile writer",
            )
        }
        Fault::Rebalance => {
            let extra = 2 + BASE_APPS;
            if cluster.running(extra) {
                let instance = cluster.slots[extra].instance.clone();
                cluster.terminate(extra).await?;
                (
                    format!("rebalance: removed app server {instance}"),
                    "rebalance (remove app server)",
                )
            } else {
                cluster.start(extra)?;
                let instance = cluster.slots[extra].instance.clone();
                (
                    format!("rebalance: added app server {instance}"),
                    "rebalance (add app server)",
                )
            }
        }
    })
}

/// Writes well-formed batches that the pool's producer never moved onto the
/// pool topic, as anyone with write access could: the keys of a published
/// batch (handed out, or about to be) under a new id, keys still in
/// `keys.<pool>` under a new id, and a real batch copied to another
/// partition. The checker then finds any of their keys handed out twice or
/// handed out from outside `used_keys`. Returns how many were written.
async fn hostile_writer(
    rng: &mut StdRng,
    cluster: &Cluster,
    db: &mongodb::Database,
) -> Result<usize> {
    use futures::TryStreamExt;
    use kgs_schemas::docs::{BatchRecord, KeyDoc, PoolDoc};
    use kgs_schemas::KeyBatch;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let pool: PoolDoc = db
        .collection::<PoolDoc>(POOLS)
        .find_one(doc! { "_id": &cluster.pool })
        .await?
        .context("pool document")?;
    let records: Vec<BatchRecord> = db
        .collection::<BatchRecord>(BATCHES)
        .find(doc! { "pool": &cluster.pool, "state": "published" })
        .limit(20)
        .await?
        .try_collect()
        .await?;
    let unused: Vec<String> = db
        .collection::<KeyDoc>(&kgs_schemas::docs::keys_collection(&cluster.pool))
        .find(doc! {})
        .limit(50)
        .await?
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        .map(|k| k.key)
        .collect();
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", cluster.servers.brokers())
        .set("message.timeout.ms", "10000")
        .create()
        .context("hostile Kafka producer")?;
    let forged_id = || format!("{}-1-forged{:016x}", cluster.pool, rand::random::<u64>());
    let mut batches: Vec<(i32, KeyBatch)> = Vec::new();
    let partitions = pool.partitions as i32;
    if let Some(real) = records.choose(rng) {
        let p = real.partition.unwrap_or(0);
        // Keys already handed out (or about to be), under a new id.
        batches.push((
            rng.random_range(0..partitions),
            KeyBatch::new(
                forged_id(),
                pool.name.clone(),
                real.epoch,
                real.keys.clone(),
            ),
        ));
        // The real batch, same id and keys, on another partition.
        if partitions > 1 {
            let other = (p + rng.random_range(1..partitions)) % partitions;
            batches.push((
                other,
                KeyBatch::new(
                    real.id.clone(),
                    pool.name.clone(),
                    real.epoch,
                    real.keys.clone(),
                ),
            ));
        }
    }
    if !unused.is_empty() {
        // Keys never moved: the producer will move and publish them later.
        batches.push((
            rng.random_range(0..partitions),
            KeyBatch::new(forged_id(), pool.name.clone(), 1, unused),
        ));
    }
    for (partition, batch) in &batches {
        let payload = batch.encode();
        producer
            .send(
                FutureRecord::to(&pool.topic)
                    .partition(*partition)
                    .key(batch.batch_id.as_bytes())
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .context("writing a forged batch")?;
    }
    Ok(batches.len())
}

/// Deletes the pool topic, with whatever it holds, and runs `kgs-producer
/// init` until it has created it again (the broker deletes a topic in the
/// background: until then `init` finds it and changes nothing), as an
/// operator would after losing the topic. The producer then re-publishes
/// the batches that were published and never claimed. Says how many batch
/// messages the old topic held.
async fn recreate_topic(cluster: &mut Cluster, db: &mongodb::Database) -> Result<String> {
    use kgs_schemas::docs::PoolDoc;

    let topic = db
        .collection::<PoolDoc>(POOLS)
        .find_one(doc! { "_id": &cluster.pool })
        .await?
        .context("pool document")?
        .topic;
    let held = kgs_tests::read_topic_batches(
        &cluster.servers.brokers(),
        &topic,
        3,
        Duration::from_secs(30),
    )
    .await
    .map_or_else(
        |e| format!("its batches unread: {e}"),
        |b| format!("{} messages in it", b.len()),
    );
    kgs_tests::kafka::delete_topic_at(&cluster.servers.brokers(), &topic).await?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        cluster.supervise()?;
        let out = cluster.init_command().output().await?;
        ensure!(
            out.status.success(),
            "kgs-producer init after deleting the topic failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if String::from_utf8_lossy(&out.stdout).contains(": created;") {
            return Ok(held);
        }
        ensure!(
            Instant::now() < deadline,
            "topic {topic} not re-created within 90 s of its deletion"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The producer slot holding the pool's lease, if the database answers.
async fn leader_slot(cluster: &Cluster, db: &mongodb::Database) -> Option<usize> {
    let lease = db
        .collection::<bson::Document>(kgs_schemas::docs::LEASES)
        .find_one(doc! { "_id": &cluster.pool })
        .await
        .ok()??;
    let holder = lease.get_str("holder").ok()?;
    (0..2).find(|i| cluster.slots[*i].instance == holder)
}

/// Waits until a client received a key, after `since`, of a batch claimed
/// after `since`: keys flow through the whole pipeline again. Returns how
/// long that took, or `None` after `bound`.
async fn wait_recovered(
    cluster: &mut Cluster,
    db: &mongodb::Database,
    clients: &Clients,
    since: DateTime<Utc>,
    bound: Duration,
) -> Result<Option<Duration>> {
    let deadline = Instant::now() + bound;
    let used = db.collection::<UsedKeyDoc>(&kgs_schemas::docs::used_keys_collection(&cluster.pool));
    let claims = db.collection::<ClaimDoc>(CLAIMS);
    let mut checked = 0;
    while Instant::now() < deadline {
        cluster.supervise()?;
        let latest: Vec<Received> = {
            let r = clients.received.lock().unwrap();
            r[checked.min(r.len())..]
                .iter()
                .filter(|k| k.at >= since)
                .cloned()
                .collect()
        };
        // Newest first: the newest key is the likeliest to be from a fresh batch.
        for k in latest.iter().rev().take(3) {
            let fresh = async {
                let u = used.find_one(doc! { "_id": &k.key }).await.ok()??;
                let c = claims.find_one(doc! { "_id": u.batch? }).await.ok()??;
                Some(c.claimed_at >= since)
            };
            if tokio::time::timeout(Duration::from_secs(5), fresh)
                .await
                .ok()
                .flatten()
                == Some(true)
            {
                return Ok(Some((k.at - since).to_std().unwrap_or_default()));
            }
        }
        checked = clients.received.lock().unwrap().len().saturating_sub(10);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(None)
}

/// Nothing left for the producer: no claim `returning`, no batch record
/// unfinished, no generation step pending.
async fn settled(db: &mongodb::Database, pool: &str) -> Result<bool> {
    let returning = db
        .collection::<bson::Document>(CLAIMS)
        .count_documents(doc! { "pool": pool, "state": "returning" })
        .await?;
    let unfinished = db
        .collection::<bson::Document>(BATCHES)
        .count_documents(doc! { "pool": pool, "state": { "$in": ["moving", "moved"] } })
        .await?;
    let generating = db
        .collection::<bson::Document>(POOLS)
        .find_one(doc! { "_id": pool })
        .await?
        .is_some_and(|d| d.get_document("generating").is_ok());
    Ok(returning == 0 && unfinished == 0 && !generating)
}

/// One client: requests a key from `addr` every `pace`, records what it gets.
async fn client(addr: String, pace: Duration, clients: Arc<Clients>) {
    while !clients.stop.load(Ordering::Acquire) {
        match get_key(&addr, Duration::from_secs(30)).await {
            Ok(Some(key)) => {
                clients.received.lock().unwrap().push(Received {
                    key,
                    at: Utc::now(),
                });
                tokio::time::sleep(pace).await;
            }
            Ok(None) => {
                clients.unavailable.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Connection refused (not running) or cut (killed mid-response).
            _ => {
                clients.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

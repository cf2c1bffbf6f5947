//! Hostile conditions, with the real binaries: bad configuration and
//! unreachable servers at start fail with one clear line and a non-zero
//! exit; a pool that runs out of keys gives app servers a prompt `503 no
//! keys` (never a hang) and shows in the producer's metrics; the pool's
//! permutation secret never appears in logs, `stats` or metrics.
//! (Bad input on the topic is covered by `consumer.rs`.)

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bson::doc;
use kgs_schemas::docs::{PoolDoc, POOLS};
use kgs_tests::metrics::first_value;
use kgs_tests::process::signal;
use kgs_tests::{
    free_addr, http_get, mongo_client, unique, wait_for, wait_healthy, AppServerCmd, ProducerCmd,
    Signal,
};

/// How long a start-up failure may take: the binaries retry servers that are
/// merely slow for a bounded time (the driver's 30 s server selection).
const START_FAILURE: Duration = Duration::from_secs(60);

/// One pool in its own database.
struct Setup {
    db: String,
    pool: String,
}

impl Setup {
    fn new() -> Self {
        Self {
            db: unique("kgs"),
            pool: unique("h"),
        }
    }

    /// `kgs-producer` with this setup's servers, database and pool.
    fn producer(&self, args: &[&str]) -> Result<ProducerCmd> {
        Ok(ProducerCmd::new(&self.db, &self.pool)?
            .args(args)
            .env("KGS_CONNECT_TIMEOUT", "5s"))
    }

    /// The app server for this pool (in the pool's default group).
    fn app_server(&self) -> Result<AppServerCmd> {
        AppServerCmd::new(&self.db, &self.pool)
    }

    async fn init(&self, extra: &[&str]) -> Result<()> {
        self.producer(&["init"])?.args(extra).success().await?;
        Ok(())
    }

    async fn pool_doc(&self) -> Result<PoolDoc> {
        mongo_client()
            .await?
            .database(&self.db)
            .collection::<PoolDoc>(POOLS)
            .find_one(doc! { "_id": &self.pool })
            .await?
            .context("pool document")
    }

    async fn drop_db(&self) {
        if let Ok(c) = mongo_client().await {
            let _ = c.database(&self.db).drop().await;
        }
    }
}

/// Runs a start that must fail to completion within [`START_FAILURE`].
async fn output(run: impl std::future::Future<Output = Result<Output>>) -> Result<Output> {
    tokio::time::timeout(START_FAILURE, run)
        .await
        .context("the process did not exit")?
}

/// Asserts a failed start: non-zero exit and exactly one line on stderr,
/// starting with `prefix` and containing `needle`.
fn one_line_failure(out: &Output, prefix: &str, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!out.status.success(), "exit status {}", out.status);
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr, got:\n{stderr}"
    );
    assert!(
        lines[0].starts_with(prefix) && lines[0].contains(needle),
        "{:?} should start with {prefix:?} and mention {needle:?}",
        lines[0]
    );
}

/// Contradictory settings, an unknown TOML key and a missing config file
/// each stop `kgs-producer` with one line naming the problem.
#[tokio::test(flavor = "multi_thread")]
async fn producer_config_errors_are_one_line() -> Result<()> {
    let s = Setup::new();
    let out = output(
        s.producer(&["run", "--low-watermark", "5", "--high-watermark", "2"])?
            .output(),
    )
    .await?;
    one_line_failure(&out, "kgs-producer:", "low_watermark");

    let toml = std::env::temp_dir().join(format!("{}.toml", unique("bad")));
    std::fs::write(&toml, "batch_sise = 7\n")?;
    let out = output(
        s.producer(&["stats", "--config", toml.to_str().unwrap()])?
            .output(),
    )
    .await?;
    one_line_failure(&out, "kgs-producer:", "batch_sise");
    let _ = std::fs::remove_file(&toml);

    let out = output(
        s.producer(&["stats", "--config", "/nonexistent/kgs.toml"])?
            .output(),
    )
    .await?;
    one_line_failure(&out, "kgs-producer:", "/nonexistent/kgs.toml");
    Ok(())
}

/// Unreachable Kafka or MongoDB at start: `kgs-producer` and the app server
/// exit non-zero with one line naming the server, after a bounded retry.
#[tokio::test(flavor = "multi_thread")]
async fn unreachable_servers_at_start_are_one_line() -> Result<()> {
    let s = Setup::new();
    let c = s
        .producer(&[])?
        .init(1, 1)
        .env("KGS_KAFKA_BROKERS", "127.0.0.1:1");
    one_line_failure(&output(c.output()).await?, "kgs-producer:", "Kafka");

    let c = s.app_server()?.env(
        "KGS_MONGODB_URI",
        "mongodb://127.0.0.1:1/?directConnection=true&serverSelectionTimeoutMS=3000",
    );
    one_line_failure(&output(c.output()).await?, "kgs-app-server:", "127.0.0.1:1");

    // A pool that does not exist is a configuration error too.
    one_line_failure(
        &output(s.app_server()?.output()).await?,
        "kgs-app-server:",
        "not found",
    );
    Ok(())
}

/// A 62-key pool served to exhaustion: the app server hands out every key
/// once and then answers each request with a prompt `503 no keys` (no
/// hang); the producer's metrics show the empty pool and the whole space used.
#[tokio::test(flavor = "multi_thread")]
async fn an_exhausted_pool_is_a_prompt_503_and_a_metric() -> Result<()> {
    let s = Setup::new();
    s.init(&["--length", "1", "--partitions", "1"]).await?;
    let producer_http = free_addr()?;
    let log = std::env::temp_dir().join(format!("{}-producer.log", s.pool));
    let mut producer = s
        .producer(&[])?
        .run(10, 3)
        .env("KGS_HTTP_ADDR", &producer_http)
        .env("KGS_HTTP_LISTEN", &producer_http)
        .log_to(&log)?
        .spawn()?;
    let app = s
        .app_server()?
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .start()
        .await?;
    let addr = app.addr().to_owned();

    let mut served = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while served.len() < 62 {
        ensure!(
            Instant::now() < deadline,
            "only {} of 62 keys served",
            served.len()
        );
        match http_get(&addr, "/keys").await? {
            (200, key) => ensure!(served.insert(key.clone()), "{key} served twice"),
            (503, body) => assert_eq!(body, "no keys\n"),
            (status, body) => anyhow::bail!("GET /keys: {status} {body}"),
        }
    }
    for _ in 0..5 {
        let started = Instant::now();
        let (status, body) = http_get(&addr, "/keys").await?;
        assert_eq!((status, body.as_str()), (503, "no keys\n"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "an empty pool must not make requests hang ({:?})",
            started.elapsed()
        );
    }
    wait_for(
        "producer metrics of an exhausted pool",
        Duration::from_secs(30),
        || async {
            let (_, text) = http_get(&producer_http, "/metrics").await?;
            Ok(
                (first_value(&text, "kgs_producer_keys_in_pool") == Some(0.0)
                    && first_value(&text, "kgs_producer_space_used_ppm") == Some(1e6)
                    && first_value(&text, "kgs_producer_pool_exhausted") == Some(1.0))
                .then_some(()),
            )
        },
    )
    .await?;
    let _ = app.stop(Signal::Kill).await;
    producer.start_kill()?;
    let _ = producer.wait().await;
    s.drop_db().await;
    Ok(())
}

/// The pool's permutation secret is in the pool document only: not in
/// `stats` (text or JSON), not in the producer's or app server's logs at
/// TRACE, not in either `/metrics`. Neither are the other secrets kgs is
/// given: a librdkafka password (`KGS_KAFKA_OPTIONS`, unused by the
/// plaintext test broker but parsed and passed on) and the app server's
/// admin token, also when a recycle is refused for a wrong one.
#[tokio::test(flavor = "multi_thread")]
async fn the_pool_secret_never_leaks() -> Result<()> {
    let s = Setup::new();
    s.init(&["--length", "2", "--partitions", "1"]).await?;
    let secret = s.pool_doc().await?.secret.0;
    ensure!(secret.len() >= 16, "secret too short to search for");
    let kafka_password = format!("kafka-pw-{}", unique("s"));
    let admin_token = format!("admin-token-{}", unique("s"));
    let kafka_options = format!("sasl.password={kafka_password}");
    let mut seen = String::new();
    for args in [&["stats"][..], &["stats", "--json"][..]] {
        let c = s
            .producer(args)?
            .env("KGS_LOG", "trace")
            .env("KGS_KAFKA_OPTIONS", &kafka_options);
        let out = output(c.output()).await?;
        ensure!(out.status.success(), "stats failed");
        seen.push_str(&String::from_utf8_lossy(&out.stdout));
        seen.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    let producer_http = free_addr()?;
    let producer_log = std::env::temp_dir().join(format!("{}-producer.log", s.pool));
    let mut producer = s
        .producer(&["run", "--batch-size", "10", "--high-watermark", "2"])?
        .env("KGS_LOG", "trace")
        .env("KGS_KAFKA_OPTIONS", &kafka_options)
        .env("KGS_HTTP_ADDR", &producer_http)
        .env("KGS_HTTP_LISTEN", &producer_http)
        .log_to(&producer_log)?
        .spawn()?;
    let app_log = std::env::temp_dir().join(format!("{}-app.log", s.pool));
    let app = s
        .app_server()?
        .env("KGS_LOG", "trace")
        .env("KGS_KAFKA_OPTIONS", &kafka_options)
        .env("KGS_ADMIN_TOKEN", &admin_token)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&app_log)?)
        .start()
        .await?;
    wait_for("a key served", Duration::from_secs(60), || async {
        Ok((app.get("/keys").await?.0 == 200).then_some(()))
    })
    .await?;
    wait_healthy(&producer_http, "/healthz", Duration::from_secs(60)).await?;
    seen.push_str(&http_get(&producer_http, "/metrics").await?.1);
    // A recycle refused for a wrong token, one with the right token.
    let key = app.key().await?.context("a key")?;
    let wrong = format!("{admin_token}-wrong");
    let (status, body) = app.delete_with_token(&key, Some(&wrong)).await?;
    assert_eq!(status, 401, "{body}");
    seen.push_str(&body);
    let (_, body) = app.delete_with_token(&key, Some(&admin_token)).await?;
    seen.push_str(&body);
    seen.push_str(&app.get("/metrics").await?.1);
    // SIGTERM, a graceful stop, so the logs include shutdown.
    signal(&producer, Signal::Term)?;
    let _ = app.stop(Signal::Term).await;
    let _ = producer.wait().await;
    seen.push_str(&std::fs::read_to_string(&producer_log)?);
    seen.push_str(&std::fs::read_to_string(&app_log)?);
    ensure!(seen.len() > 1_000, "too little output to prove anything");
    assert!(
        !seen.contains(&secret),
        "the pool secret appears in logs, stats or metrics"
    );
    for (what, value) in [
        ("the Kafka password", &kafka_password),
        ("the admin token", &admin_token),
    ] {
        assert!(
            !seen.contains(value.as_str()),
            "{what} appears in logs, stats or metrics"
        );
    }
    let _ = std::fs::remove_file(&producer_log);
    let _ = std::fs::remove_file(&app_log);
    s.drop_db().await;
    Ok(())
}

/// The pool topic changed under a running producer: more partitions than the
/// pool was created with, then the topic deleted. Each is reported as a
/// `topic` error: the `errors_total{kind="topic"}` metric and an ERROR line
/// naming the topic and what is wrong.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_or_deleted_topic_is_detected() -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    use rdkafka::client::DefaultClientContext;

    let s = Setup::new();
    s.init(&["--length", "1", "--partitions", "1"]).await?;
    let topic = s.pool_doc().await?.topic;
    let producer_http = free_addr()?;
    let log = std::env::temp_dir().join(format!("{}-producer.log", s.pool));
    let mut producer = s
        .producer(&["run", "--batch-size", "5", "--poll-interval", "100ms"])?
        .env("KGS_HTTP_ADDR", &producer_http)
        .log_to(&log)?
        .spawn()?;

    let topic_errors = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("kgs_producer_errors_total") && l.contains("kind=\"topic\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Leading and publishing with the topic as created: no topic error.
    wait_for(
        "the producer to publish",
        Duration::from_secs(60),
        || async {
            let Ok((_, text)) = http_get(&producer_http, "/metrics").await else {
                return Ok(None);
            };
            let published =
                first_value(&text, "kgs_producer_batches_published_total").unwrap_or(0.0);
            Ok((published > 0.0).then_some(text))
        },
    )
    .await
    .map(|text| assert_eq!(topic_errors(&text), 0.0))?;

    let admin: AdminClient<DefaultClientContext> = kgs_tests::kafka_config().create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin
        .create_partitions([&NewPartitions::new(&topic, 2)], &opts)
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("create partitions of {t}: {e}"))?;
    }
    wait_for(
        "a topic error for the new partition count",
        Duration::from_secs(60),
        || async {
            let (_, text) = http_get(&producer_http, "/metrics").await?;
            Ok((topic_errors(&text) > 0.0).then_some(()))
        },
    )
    .await?;

    kgs_tests::kafka::delete_topic(&topic).await?;
    wait_for(
        "the deleted topic in the producer's log",
        Duration::from_secs(60),
        || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(text.contains("does not exist").then_some(text))
        },
    )
    .await
    .map(|text| {
        let line = text
            .lines()
            .find(|l| l.contains("does not exist"))
            .unwrap_or_default();
        assert!(line.contains("ERROR") && line.contains(&topic), "{line}");
        assert!(
            text.lines()
                .any(|l| l.contains("2 partitions") && l.contains("ERROR")),
            "no ERROR line about the partition count"
        );
    })?;
    producer.start_kill()?;
    let _ = producer.wait().await;
    s.drop_db().await;
    Ok(())
}

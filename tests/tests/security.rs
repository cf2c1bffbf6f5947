//! Least privilege against the secured Kafka (`scripts/servers.sh up
//! kafka-secure`: SASL_SSL only, a local CA, SCRAM-SHA-512 users and the
//! ACLs of the README's *Security* section). kgs runs end to end as its two
//! principals; a principal that tries more than its ACLs allow is refused by
//! the broker; a client Kafka will not let in gets one clear line from kgs,
//! at once, and no secret is ever printed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kgs_tests::{unique, AppServerCmd, ProducerCmd, Signal};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

/// How long a refused client may take to say so (the first metadata
/// request's timeout is 5 s; a retry loop would take the 10 s connect
/// timeout of the test commands, or forever).
const REFUSAL_WITHIN: Duration = Duration::from_secs(9);

/// What `scripts/servers.sh` made for a secured instance: a directory with
/// the local CA (`tls/ca.pem`) and a password file per user (`users/<user>`).
struct Credentials {
    dir: PathBuf,
    /// The `servers.sh` name of the instance, for the error of a missing file.
    instance: &'static str,
}

impl Credentials {
    /// The directory named by `var`, else `.cache/<default>` of this repo.
    fn from_env(var: &str, default: &str, instance: &'static str) -> Self {
        let dir = std::env::var(var).map(PathBuf::from).unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../.cache")
                .join(default)
        });
        Self { dir, instance }
    }

    fn ca(&self) -> String {
        self.dir.join("tls/ca.pem").display().to_string()
    }

    fn password(&self, user: &str) -> Result<String> {
        let path = self.dir.join("users").join(user);
        std::fs::read_to_string(&path)
            .map(|p| p.trim().to_owned())
            .with_context(|| {
                format!(
                    "reading {} (start it: scripts/servers.sh up {})",
                    path.display(),
                    self.instance
                )
            })
    }
}

/// The secured broker and its credentials, as `servers.sh` made them.
struct Secure {
    brokers: String,
    creds: Credentials,
}

impl Secure {
    fn new() -> Self {
        Self {
            brokers: std::env::var("KGS_KAFKA_SECURE_BROKERS")
                .unwrap_or_else(|_| "127.0.0.1:9094".to_owned()),
            creds: Credentials::from_env("KGS_KAFKA_SECURE_DIR", "kafka-secure", "kafka-secure"),
        }
    }

    /// The librdkafka settings of `user` with `password`, as kgs takes
    /// them (`KGS_KAFKA_OPTIONS`).
    fn options(&self, user: &str, password: &str, ca: &str) -> Vec<(String, String)> {
        [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", user),
            ("sasl.password", password),
            ("ssl.ca.location", ca),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn env_options(&self, user: &str, password: &str, ca: &str) -> String {
        self.options(user, password, ca)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn producer(&self, db: &str, pool: &str, user: &str, password: &str) -> Result<ProducerCmd> {
        Ok(ProducerCmd::new(db, pool)?
            .servers(&self.brokers, &kgs_tests::mongodb_uri())
            .env(
                "KGS_KAFKA_OPTIONS",
                self.env_options(user, password, &self.creds.ca()),
            ))
    }

    fn app_server(&self, db: &str, pool: &str, user: &str, password: &str) -> Result<AppServerCmd> {
        Ok(AppServerCmd::new(db, pool)?
            .servers(&self.brokers, &kgs_tests::mongodb_uri())
            .env(
                "KGS_KAFKA_OPTIONS",
                self.env_options(user, password, &self.creds.ca()),
            ))
    }
}

/// Creates a pool over TLS + SCRAM as the producer principal.
async fn init(secure: &Secure, db: &str, pool: &str) -> Result<()> {
    let password = secure.creds.password("kgs-producer")?;
    let out = secure
        .producer(db, pool, "kgs-producer", &password)?
        .init(4, 2)
        .args(["--initial-keys", "600"])
        .success()
        .await?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    ensure!(!text.contains(&password), "init printed the password");
    Ok(())
}

/// The pool's topic name, from the pool document.
async fn topic_of(db: &str, pool: &str) -> Result<String> {
    let doc = kgs_tests::find_docs(db, "pools", bson::doc! { "_id": pool })
        .await?
        .into_iter()
        .next()
        .context("pool document")?;
    Ok(doc.get_str("topic")?.to_owned())
}

/// The last line of a refused command's stderr, after checking that it
/// failed, said so within [`REFUSAL_WITHIN`], in one line starting with
/// `prefix`, and never printed `secret`.
fn one_line_refusal(
    out: &std::process::Output,
    took: Duration,
    prefix: &str,
    secret: &str,
) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "expected a failure, got {}: {stderr}",
        out.status
    );
    assert!(took < REFUSAL_WITHIN, "took {took:?} to refuse: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line: {stderr}");
    assert!(lines[0].starts_with(prefix), "{stderr}");
    assert!(
        !stderr.contains(secret) && !stdout.contains(secret),
        "a secret was printed: {stderr}"
    );
    lines[0].to_owned()
}

/// Runs a kgs process that gets past its start-up checks and is then
/// refused: it must exit non-zero within [`REFUSAL_WITHIN`] without
/// printing `secret` (one that retries for ever is killed, on drop, after
/// twice that). Returns its last stderr line and the whole stderr.
async fn gives_up(
    run: impl std::future::Future<Output = Result<std::process::Output>>,
    secret: &str,
) -> Result<(String, String)> {
    let started = Instant::now();
    let out = tokio::time::timeout(REFUSAL_WITHIN * 2, run)
        .await
        .context("kept running instead of giving up")??;
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected a failure: {stderr}");
    assert!(took < REFUSAL_WITHIN, "took {took:?} to give up: {stderr}");
    assert!(!stderr.contains(secret), "a secret was printed");
    let last = stderr.lines().last().unwrap_or_default().to_owned();
    Ok((last, stderr))
}

/// kgs runs end to end over TLS + SCRAM with the least-privilege ACLs: the
/// producer principal creates the pool and its topic and publishes in
/// transactions, the app-server principal claims and hands keys out; no
/// password appears in either log or in `stats`.
#[tokio::test(flavor = "multi_thread")]
async fn kgs_runs_end_to_end_as_least_privileged_principals() -> Result<()> {
    let secure = Secure::new();
    let db = unique("sec");
    let pool = unique("p");
    init(&secure, &db, &pool).await?;
    let producer_password = secure.creds.password("kgs-producer")?;
    let app_password = secure.creds.password("kgs-app")?;
    let log = std::env::temp_dir().join(format!("{pool}-producer.log"));
    let producer = secure
        .producer(&db, &pool, "kgs-producer", &producer_password)?
        .env("KGS_LOG", "debug")
        .run(50, 3)
        .log_to(&log)?
        .spawn()?;
    let app_log = std::env::temp_dir().join(format!("{pool}-app.log"));
    let server = secure
        .app_server(&db, &pool, "kgs-app", &app_password)?
        .env("KGS_LOG", "debug")
        .stdout(std::fs::File::create(&app_log)?)
        .stderr(std::fs::File::create(app_log.with_extension("err"))?)
        .start()
        .await?;
    let keys = server.keys(120, Duration::from_secs(90)).await?;
    let distinct: std::collections::HashSet<&String> = keys.iter().collect();
    assert_eq!(distinct.len(), keys.len(), "a key was handed out twice");
    let stats = secure
        .producer(&db, &pool, "kgs-producer", &producer_password)?
        .args(["stats", "--pool", &pool])
        .success()
        .await?;
    let stats = String::from_utf8_lossy(&stats.stdout).to_string();
    assert!(stats.contains(&pool), "{stats}");
    assert!(
        !stats.contains(&producer_password),
        "stats printed the password"
    );
    let status = server.stop(Signal::Term).await?;
    assert!(status.success(), "app server exit {status}");
    kgs_tests::terminate(producer).await?;
    let log = std::fs::read_to_string(&log)?;
    assert!(log.contains("leading"), "{log}");
    assert!(
        !log.contains(&producer_password),
        "the producer logged its password"
    );
    let app = std::fs::read_to_string(&app_log)?
        + &std::fs::read_to_string(app_log.with_extension("err"))?;
    assert!(app.contains("consumer started"), "{app}");
    assert!(
        !app.contains(&app_password),
        "the app server logged its password"
    );
    Ok(())
}

/// The app-server principal can read the pool topic but not write it, nor
/// use a transactional id: a forged batch cannot even reach the topic
/// through an app server's credentials.
#[tokio::test(flavor = "multi_thread")]
async fn an_app_server_principal_cannot_write_the_pool_topic() -> Result<()> {
    let secure = Secure::new();
    let db = unique("sec");
    let pool = unique("p");
    init(&secure, &db, &pool).await?;
    let topic = topic_of(&db, &pool).await?;
    let app_password = secure.creds.password("kgs-app")?;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &secure.brokers)
        .set("message.timeout.ms", "10000");
    for (k, v) in secure.options("kgs-app", &app_password, &secure.creds.ca()) {
        config.set(k, v);
    }
    let plain: FutureProducer = config.create()?;
    let sent = plain
        .send(
            FutureRecord::to(&topic)
                .key("x")
                .payload("{\"forged\":true}"),
            Duration::from_secs(15),
        )
        .await;
    match sent {
        Err((KafkaError::MessageProduction(code), _)) => {
            assert_eq!(code, RDKafkaErrorCode::TopicAuthorizationFailed, "{code:?}")
        }
        other => panic!("the app principal wrote to {topic}: {other:?}"),
    }
    let mut txn = config.clone();
    txn.set("transactional.id", format!("kgs-producer.{pool}.forged"));
    let txn: FutureProducer = txn.create()?;
    let refused =
        tokio::task::spawn_blocking(move || txn.init_transactions(Duration::from_secs(15)))
            .await?
            .expect_err("the app principal initialised a transactional producer");
    assert_eq!(
        refused.rdkafka_error_code(),
        Some(RDKafkaErrorCode::TransactionalIdAuthorizationFailed),
        "{refused}"
    );
    Ok(())
}

/// Clients Kafka will not let in get one line from kgs, within seconds and
/// without a retry loop, naming the reason, and the password is never
/// printed: a wrong password (producer and app server), a broker
/// certificate signed by a CA the client does not trust, and a principal
/// without ACLs for the pool topic.
#[tokio::test(flavor = "multi_thread")]
async fn refused_clients_get_one_line_at_once() -> Result<()> {
    let secure = Secure::new();
    let db = unique("sec");
    let pool = unique("p");
    init(&secure, &db, &pool).await?;
    let wrong = format!("wrong-{}", unique("pw"));

    let started = Instant::now();
    let out = secure
        .producer(&db, &pool, "kgs-producer", &wrong)?
        .init(4, 2)
        .output()
        .await?;
    let line = one_line_refusal(&out, started.elapsed(), "kgs-producer: Kafka at", &wrong);
    assert!(
        line.contains("refused this client") && line.contains("SASL authentication"),
        "{line}"
    );
    println!("producer, wrong password: {line}");

    let started = Instant::now();
    let out = secure
        .app_server(&db, &pool, "kgs-app", &wrong)?
        .output()
        .await?;
    let line = one_line_refusal(&out, started.elapsed(), "kgs-app-server:", &wrong);
    assert!(
        line.contains("refused this client") && line.contains("SASL authentication"),
        "{line}"
    );
    println!("app server, wrong password: {line}");

    // A CA bundle that does not hold the local CA: the handshake fails.
    let password = secure.creds.password("kgs-producer")?;
    let other_ca = std::env::temp_dir().join(format!("{}-other-ca.pem", unique("ca")));
    std::fs::write(
        &other_ca,
        std::fs::read(secure.creds.dir.join("tls/broker.pem"))?,
    )?;
    let started = Instant::now();
    let out = ProducerCmd::new(&db, &pool)?
        .servers(&secure.brokers, &kgs_tests::mongodb_uri())
        .env(
            "KGS_KAFKA_OPTIONS",
            secure.env_options("kgs-producer", &password, &other_ca.display().to_string()),
        )
        .init(4, 2)
        .output()
        .await?;
    let line = one_line_refusal(&out, started.elapsed(), "kgs-producer: Kafka at", &password);
    assert!(line.contains("SSL handshake failed"), "{line}");
    println!("producer, untrusted broker certificate: {line}");

    // The admin-less app principal asking to create a pool: no ACL lets it
    // create the topic.
    let app_password = secure.creds.password("kgs-app")?;
    let started = Instant::now();
    let out = secure
        .producer(&db, &unique("p"), "kgs-app", &app_password)?
        .init(4, 2)
        .output()
        .await?;
    let line = one_line_refusal(&out, started.elapsed(), "kgs-producer:", &app_password);
    assert!(
        line.contains("TopicAuthorizationFailed") || line.contains("not allowed"),
        "{line}"
    );
    println!("app principal creating a pool: {line}");

    // The app principal running the producer of an existing pool: it may
    // read the topic, so it gets as far as the lease, but the broker refuses
    // its transactional id. No retry can help: the producer hands the lease
    // back (a correct standby takes over at once) and ends with one line,
    // instead of taking the lease again and again.
    let run = secure
        .producer(&db, &pool, "kgs-app", &app_password)?
        .env("KGS_LOG", "info")
        .run(10, 2)
        .output();
    let (last, stderr) = gives_up(run, &app_password).await?;
    assert!(
        last.starts_with("kgs-producer: Kafka at")
            && last.contains("refused this client")
            && last.contains("Transactional Id authorization failed"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("lease taken").count(),
        1,
        "the lease was taken more than once: {stderr}"
    );
    assert!(stderr.contains("lease released"), "{stderr}");
    println!("app principal running the producer: {last}");

    // The producer principal running an app server: it may describe the
    // topic, so the start-up check passes, but it has no Read on the app
    // servers' group. The consume loop's refusal stops the app server with
    // one line, instead of answering 503 for ever.
    let password = secure.creds.password("kgs-producer")?;
    let run = secure
        .app_server(&db, &pool, "kgs-producer", &password)?
        .env("KGS_LOG", "warn")
        .output();
    let (last, stderr) = gives_up(run, &password).await?;
    assert!(
        last.starts_with("kgs-app-server: Kafka at")
            && last.contains("refused this client")
            && last.contains("GroupAuthorizationFailed"),
        "{stderr}"
    );
    println!("producer principal running an app server: {last}");
    Ok(())
}

/// The secured SecantusDB (`scripts/servers.sh up mongo-secure`): SCRAM and
/// TLS only; users `kgs-producer` (readWrite on [`SECURE_DB`]) and
/// `kgs-app` (the custom role `kgsAppServer` of the README).
struct SecureMongo {
    port: u16,
    creds: Credentials,
}

/// The one database the secured instance's kgs users have rights on.
const SECURE_DB: &str = "kgs-secure";

impl SecureMongo {
    fn new() -> Self {
        Self {
            port: std::env::var("KGS_MONGO_SECURE_PORT")
                .ok()
                .and_then(|p| p.parse().ok())
                .unwrap_or(27019),
            creds: Credentials::from_env("KGS_MONGO_SECURE_DIR", "secantus-secure", "mongo-secure"),
        }
    }

    /// The connection string of `user`, trusting `ca`.
    fn uri(&self, user: &str, password: &str, ca: &str) -> String {
        format!(
            "mongodb://{user}:{password}@127.0.0.1:{}/?directConnection=true&tls=true&tlsCAFile={ca}&authSource=admin",
            self.port
        )
    }
}

/// kgs runs end to end with both servers secured: MongoDB with SCRAM and
/// TLS (the producer as a `readWrite` user, the app server with the
/// app-server role) and Kafka with SASL_SSL and the ACLs; no password of
/// either appears in a log or in `stats`.
#[tokio::test(flavor = "multi_thread")]
async fn kgs_runs_against_authenticated_tls_mongodb() -> Result<()> {
    let kafka = Secure::new();
    let mongo = SecureMongo::new();
    let pool = unique("p");
    let producer_kafka = kafka.creds.password("kgs-producer")?;
    let app_kafka = kafka.creds.password("kgs-app")?;
    let producer_mongo = mongo.creds.password("kgs-producer")?;
    let app_mongo = mongo.creds.password("kgs-app")?;
    let producer_uri = mongo.uri("kgs-producer", &producer_mongo, &mongo.creds.ca());
    let producer = |args: &[&str]| -> Result<ProducerCmd> {
        Ok(kafka
            .producer(SECURE_DB, &pool, "kgs-producer", &producer_kafka)?
            .servers(&kafka.brokers, &producer_uri)
            .args(args))
    };
    let secrets = [&producer_kafka, &app_kafka, &producer_mongo, &app_mongo];
    let init = producer(&[])?
        .init(4, 2)
        .args(["--initial-keys", "600"])
        .success()
        .await?;
    let text =
        String::from_utf8_lossy(&init.stdout).to_string() + &String::from_utf8_lossy(&init.stderr);
    assert!(
        secrets.iter().all(|s| !text.contains(s.as_str())),
        "init printed a password"
    );

    let log = std::env::temp_dir().join(format!("{pool}-producer.log"));
    let run = producer(&[])?
        .env("KGS_LOG", "debug")
        .run(50, 3)
        .log_to(&log)?
        .spawn()?;
    let app_log = std::env::temp_dir().join(format!("{pool}-app.err"));
    let server = kafka
        .app_server(SECURE_DB, &pool, "kgs-app", &app_kafka)?
        .servers(
            &kafka.brokers,
            &mongo.uri("kgs-app", &app_mongo, &mongo.creds.ca()),
        )
        .env("KGS_LOG", "debug")
        .stderr(std::fs::File::create(&app_log)?)
        .start()
        .await?;
    let keys = server.keys(120, Duration::from_secs(90)).await?;
    let distinct: std::collections::HashSet<&String> = keys.iter().collect();
    assert_eq!(distinct.len(), keys.len(), "a key was handed out twice");
    assert_eq!(keys.len(), 120);
    let (status, count) = server.get("/keys/count").await?;
    assert_eq!(status, 200, "the app role may count keys: {count}");

    let stats = producer(&["stats", "--pool", &pool])?.success().await?;
    let stats = String::from_utf8_lossy(&stats.stdout).to_string();
    assert!(stats.contains(&pool), "{stats}");
    assert!(
        secrets.iter().all(|s| !stats.contains(s.as_str())),
        "stats printed a password"
    );

    let status = server.stop(Signal::Term).await?;
    assert!(status.success(), "app server exit {status}");
    kgs_tests::terminate(run).await?;
    let logs = std::fs::read_to_string(&log)? + &std::fs::read_to_string(&app_log)?;
    assert!(logs.contains("leading") && logs.contains("consumer started"));
    assert!(
        secrets.iter().all(|s| !logs.contains(s.as_str())),
        "a password was logged"
    );
    Ok(())
}

/// MongoDB clients the server will not let in get one line from kgs,
/// within seconds, naming the reason, without the password: a wrong
/// password (producer and app server) and a CA that did not sign the
/// server's certificate.
#[tokio::test(flavor = "multi_thread")]
async fn refused_mongodb_clients_get_one_line_at_once() -> Result<()> {
    let mongo = SecureMongo::new();
    let pool = unique("p");
    let wrong = format!("wrong-{}", unique("pw"));

    let started = Instant::now();
    let out = ProducerCmd::new(SECURE_DB, &pool)?
        .servers(
            &kgs_tests::kafka_brokers(),
            &mongo.uri("kgs-producer", &wrong, &mongo.creds.ca()),
        )
        .init(4, 2)
        .output()
        .await?;
    let line = one_line_refusal(&out, started.elapsed(), "kgs-producer: MongoDB at", &wrong);
    assert!(
        line.contains("refused this client") && line.contains("authentication failed"),
        "{line}"
    );
    println!("producer, wrong MongoDB password: {line}");

    let started = Instant::now();
    let out = AppServerCmd::new(SECURE_DB, &pool)?
        .servers(
            &kgs_tests::kafka_brokers(),
            &mongo.uri("kgs-app", &wrong, &mongo.creds.ca()),
        )
        .output()
        .await?;
    let line = one_line_refusal(&out, started.elapsed(), "kgs-app-server:", &wrong);
    assert!(
        line.contains("MongoDB at") && line.contains("refused this client"),
        "{line}"
    );
    println!("app server, wrong MongoDB password: {line}");

    // The Kafka test CA did not sign the MongoDB server's certificate.
    let password = mongo.creds.password("kgs-producer")?;
    let other_ca = Secure::new().creds.ca();
    let started = Instant::now();
    let out = ProducerCmd::new(SECURE_DB, &pool)?
        .servers(
            &kgs_tests::kafka_brokers(),
            &mongo.uri("kgs-producer", &password, &other_ca),
        )
        .init(4, 2)
        .output()
        .await?;
    let line = one_line_refusal(
        &out,
        started.elapsed(),
        "kgs-producer: MongoDB at",
        &password,
    );
    assert!(line.contains("invalid peer certificate"), "{line}");
    println!("producer, untrusted MongoDB certificate: {line}");
    Ok(())
}

/// An app server whose MongoDB user may read but not write claims (the
/// built-in `read` role, which SecantusDB enforces) claims nothing, hands
/// nothing out, and stops with one line naming the refusal, instead of
/// retrying the claim for ever.
#[tokio::test(flavor = "multi_thread")]
async fn an_app_server_that_may_not_write_claims_stops_with_one_line() -> Result<()> {
    let mongo = SecureMongo::new();
    let pool = unique("p");
    let producer_uri = mongo.uri(
        "kgs-producer",
        &mongo.creds.password("kgs-producer")?,
        &mongo.creds.ca(),
    );
    let producer = || -> Result<ProducerCmd> {
        Ok(ProducerCmd::new(SECURE_DB, &pool)?.servers(&kgs_tests::kafka_brokers(), &producer_uri))
    };
    producer()?
        .init(4, 1)
        .args(["--initial-keys", "200"])
        .success()
        .await?;
    let run = producer()?.run(20, 2).spawn()?;
    // A published batch is waiting before the app server starts.
    let db = mongodb::Client::with_uri_str(&producer_uri)
        .await?
        .database(SECURE_DB);
    kgs_tests::wait_for("a batch published", Duration::from_secs(60), || async {
        let n = db
            .collection::<bson::Document>("batches")
            .count_documents(bson::doc! { "pool": &pool })
            .await?;
        Ok((n > 0).then_some(()))
    })
    .await?;

    let reader = mongo.creds.password("kgs-reader")?;
    let app = AppServerCmd::new(SECURE_DB, &pool)?
        .servers(
            &kgs_tests::kafka_brokers(),
            &mongo.uri("kgs-reader", &reader, &mongo.creds.ca()),
        )
        .env("KGS_LOG", "warn")
        .output();
    let (last, stderr) = gives_up(app, &reader).await?;
    assert!(
        last.starts_with("kgs-app-server: MongoDB at")
            && last.contains("refused this client")
            && last.contains("not authorized"),
        "{stderr}"
    );
    let claims = db
        .collection::<bson::Document>("claims")
        .count_documents(bson::doc! { "pool": &pool })
        .await?;
    assert_eq!(claims, 0, "a user without claim writes claimed a batch");
    println!("app server whose user may not write claims: {last}");
    kgs_tests::terminate(run).await?;
    Ok(())
}

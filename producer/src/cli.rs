//! The command line: clap definitions of every subcommand, and the merge of
//! TOML file, `KGS_*` environment and flags into one [`Config`] (flags and
//! environment win over the file, the file over the defaults).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kgs_schemas::{KeyFormat, BASE62};

use crate::cmd::init::PoolSpec;
use crate::config::Config;
use crate::error::{Error, Result};
use kgs_schemas::duration;

/// kgs producer: keeps a pool of pre-generated keys in MongoDB and publishes
/// key batches to Kafka.
#[derive(Debug, Parser)]
#[command(name = "kgs-producer", version, about, long_about = None)]
pub struct Cli {
    /// Settings shared by every command.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: CommandArgs,
}

/// Settings shared by every command.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// TOML configuration file (keys as in `Config`, e.g. `batch_size = 1000`).
    #[arg(long, global = true, env = "KGS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers.
    #[arg(long, global = true, env = "KGS_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// MongoDB connection string.
    #[arg(long, global = true, env = "KGS_MONGODB_URI", hide_env_values = true)]
    pub mongodb_uri: Option<String>,
    /// Database holding every pool [default: kgs].
    #[arg(long, global = true, env = "KGS_MONGODB_DB")]
    pub mongodb_db: Option<String>,
    /// Lease duration, e.g. `10s` [default: 10s].
    #[arg(long, global = true, env = "KGS_LEASE_DURATION", value_parser = duration::parse)]
    pub lease_duration: Option<Duration>,
    /// How long to retry unreachable servers at start, e.g. `30s`.
    #[arg(long, global = true, env = "KGS_CONNECT_TIMEOUT", value_parser = duration::parse)]
    pub connect_timeout: Option<Duration>,
    /// Keys to keep in `keys.<pool>` [default: min(space, 1000000)].
    #[arg(long, global = true, env = "KGS_TARGET_SIZE")]
    pub target_size: Option<u64>,
    /// Keys per crash-safe generation step [default: 10000].
    #[arg(long, global = true, env = "KGS_GENERATE_CHUNK")]
    pub generate_chunk: Option<u64>,
    /// Extra librdkafka setting `name=value` for every Kafka client (TLS,
    /// SASL, ...); repeatable; the environment variable takes a comma list.
    #[arg(
        long = "kafka-option",
        global = true,
        env = "KGS_KAFKA_OPTIONS",
        hide_env_values = true,
        value_delimiter = ',',
        value_parser = crate::config::KafkaOptions::parse_pair
    )]
    pub kafka_options: Vec<(String, String)>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum CommandArgs {
    /// Create a pool (document, collections, indexes, topic) and generate its
    /// first keys. Re-running with the same settings changes nothing.
    Init(InitArgs),
    /// Run the producer of a pool: lead (or stand by), keep the topic's
    /// partitions between the watermarks, top the pool up.
    Run(RunArgs),
    /// Show a pool's collStats, progress, backlog and leader.
    Stats(StatsArgs),
    /// Take keys out of circulation (e.g. `api`, `www`, `admin`).
    Reserve(ReserveArgs),
    /// Add words to a pool's blocklist: no key generated from now on holds
    /// them, and the leading producer takes the matching keys already
    /// generated out of `keys` (keys handed out already are counted, never
    /// recalled).
    BlocklistAdd(BlocklistAddArgs),
    /// Put handed-out keys the application no longer uses back into the
    /// pool (the leading producer moves them); one line per key, exit 1 if
    /// any was refused.
    Recycle(RecycleArgs),
}

/// `init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Pool name (a-z, 0-9, `_`, `-`).
    #[arg(long, env = "KGS_POOL")]
    pub pool: String,
    /// Key length; with --max-length, the shortest length.
    #[arg(long)]
    pub length: u32,
    /// Grow the keys when a length runs out: keys of --length are handed
    /// out first, then (without a restart) every key one character longer,
    /// up to this length, each length in its own unguessable order.
    #[arg(long, value_name = "LENGTH")]
    pub max_length: Option<u32>,
    /// Alphabet, in digit order.
    #[arg(long, default_value = BASE62)]
    pub alphabet: String,
    /// A named alphabet instead of --alphabet: base62 (the default), base58
    /// (no 0 O I l), lower36 (a-z 0-9: for case-insensitive URLs),
    /// crockford32 (no I L O U), unambiguous (lowercase and digits without
    /// 0 1 i j l o).
    #[arg(
        long,
        conflicts_with = "alphabet",
        value_parser = clap::builder::PossibleValuesParser::new(
            kgs_schemas::ALPHABET_PRESETS.iter().map(|(name, _, _)| *name)
        )
    )]
    pub alphabet_preset: Option<String>,
    /// Partitions of the pool's topic.
    #[arg(long, default_value_t = 3)]
    pub partitions: u32,
    /// Words no generated key may contain (case and look-alike digits
    /// folded, anywhere in a key): `default` for the project's English
    /// list, or a file of one word per line; repeatable.
    #[arg(long = "blocklist", value_name = "default|FILE")]
    pub blocklists: Vec<String>,
    /// How long a recycled key stays out of circulation before it is
    /// handed out again (so caches and old links never resolve to a new
    /// target); `0s` for at once [default for a new pool: 30d].
    #[arg(long, value_parser = duration::parse, overrides_with = "recycle_cooldown")]
    pub recycle_cooldown: Option<Duration>,
    /// Keys to generate before `init` returns; a running producer generates
    /// the rest up to the target size while it publishes (so the first keys
    /// can be handed out within seconds) [default: the target size].
    #[arg(long, env = "KGS_INITIAL_KEYS")]
    pub initial_keys: Option<u64>,
}

/// `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Pool name.
    #[arg(long, env = "KGS_POOL")]
    pub pool: String,
    /// Consumer group whose committed offsets define the backlog [default: kgs.<pool>.<incarnation>].
    #[arg(long, env = "KGS_GROUP")]
    pub group: Option<String>,
    /// Keys per batch [default: 1000].
    #[arg(long, env = "KGS_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Largest batch while consumers drain fast [default: 10 × batch size,
    /// at most 10,000]; equal to --batch-size for a fixed size.
    #[arg(long, env = "KGS_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,
    /// Refill a partition when its backlog is at or below this many batches [default: 2].
    #[arg(long, env = "KGS_LOW_WATERMARK")]
    pub low_watermark: Option<u64>,
    /// Fill a partition up to this many batches [default: 10].
    #[arg(long, env = "KGS_HIGH_WATERMARK")]
    pub high_watermark: Option<u64>,
    /// Idle polling interval, e.g. `500ms`.
    #[arg(long, env = "KGS_POLL_INTERVAL", value_parser = duration::parse)]
    pub poll_interval: Option<Duration>,
    /// How often the leader looks for unfinished batches of older epochs
    /// and for keys written back below the batch window, e.g. `30s`.
    #[arg(long, env = "KGS_RECOVERY_INTERVAL", value_parser = duration::parse)]
    pub recovery_interval: Option<Duration>,
    /// Graceful shutdown deadline, e.g. `20s`.
    #[arg(long, env = "KGS_SHUTDOWN_TIMEOUT", value_parser = duration::parse)]
    pub shutdown_timeout: Option<Duration>,
    /// Serve /metrics, /healthz, /readyz on this address, e.g. `127.0.0.1:9100`.
    #[arg(long, env = "KGS_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// This instance's id in the lease [default: <host>-<pid>-<random>].
    #[arg(long, env = "KGS_INSTANCE_ID")]
    pub instance_id: Option<String>,
}

/// `stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Only this pool [default: every pool].
    #[arg(long, env = "KGS_POOL")]
    pub pool: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `reserve`.
#[derive(Debug, Args)]
pub struct ReserveArgs {
    /// Pool name.
    #[arg(long, env = "KGS_POOL")]
    pub pool: String,
    /// Keys to reserve.
    #[arg(required = true)]
    pub keys: Vec<String>,
}

/// `blocklist-add`.
#[derive(Debug, Args)]
pub struct BlocklistAddArgs {
    /// Pool name.
    #[arg(long, env = "KGS_POOL")]
    pub pool: String,
    /// Words to add: `default` for the project's English list, or a file of
    /// one word per line; repeatable. Words already listed are skipped.
    #[arg(long = "blocklist", value_name = "default|FILE", required = true)]
    pub blocklists: Vec<String>,
}

/// `recycle`.
#[derive(Debug, Args)]
pub struct RecycleArgs {
    /// Pool name.
    #[arg(long, env = "KGS_POOL")]
    pub pool: String,
    /// Keys to recycle; none or `-` reads whitespace-separated keys from stdin.
    pub keys: Vec<String>,
}

/// A resolved command.
#[derive(Debug, Clone)]
pub enum Command {
    /// Create a pool and generate its first keys.
    Init {
        /// What to create.
        spec: Box<PoolSpec>,
        /// Keys to generate before returning (`None`: the target size).
        initial_keys: Option<u64>,
    },
    /// Run the producer of a pool.
    Run {
        /// Pool name.
        pool: String,
    },
    /// Print stats.
    Stats {
        /// Only this pool.
        pool: Option<String>,
        /// As JSON.
        json: bool,
    },
    /// Recycle handed-out keys.
    Recycle {
        /// Pool name.
        pool: String,
        /// The keys (empty or `-`: read from stdin).
        keys: Vec<String>,
    },
    /// Reserve keys.
    Reserve {
        /// Pool name.
        pool: String,
        /// The keys.
        keys: Vec<String>,
    },
    /// Add words to a pool's blocklist.
    BlocklistAdd {
        /// Pool name.
        pool: String,
        /// The folded words.
        words: Vec<String>,
    },
}

impl Cli {
    /// The command and the merged configuration.
    pub fn resolve(self) -> Result<(Command, Config)> {
        let g = self.global;
        let mut c = match &g.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        set(&mut c.kafka_brokers, g.kafka_brokers);
        set(&mut c.mongodb_uri, g.mongodb_uri);
        set(&mut c.mongodb_db, g.mongodb_db);
        set(&mut c.lease_duration, g.lease_duration);
        set(&mut c.connect_timeout, g.connect_timeout);
        set(&mut c.generate_chunk, g.generate_chunk);
        c.kafka_options.0.extend(g.kafka_options);
        c.target_size = g.target_size.or(c.target_size);
        let command = match self.command {
            CommandArgs::Init(a) => Command::Init {
                spec: Box::new(PoolSpec {
                    format: KeyFormat::with_lengths(
                        a.alphabet_preset
                            .as_deref()
                            .and_then(kgs_schemas::alphabet_preset)
                            .unwrap_or(&a.alphabet),
                        a.length,
                        a.max_length.unwrap_or(a.length),
                    )
                    .map_err(|e| Error::Config(e.to_string()))?,
                    name: a.pool,
                    partitions: a.partitions,
                    blocklist: (!a.blocklists.is_empty())
                        .then(|| blocklist_words(&a.blocklists))
                        .transpose()?,
                    recycle_cooldown: a.recycle_cooldown,
                }),
                initial_keys: a.initial_keys,
            },
            CommandArgs::Run(a) => {
                c.group = a.group.or(c.group);
                set(&mut c.batch_size, a.batch_size);
                c.max_batch_size = a.max_batch_size.or(c.max_batch_size);
                set(&mut c.low_watermark, a.low_watermark);
                set(&mut c.high_watermark, a.high_watermark);
                set(&mut c.poll_interval, a.poll_interval);
                set(&mut c.recovery_interval, a.recovery_interval);
                set(&mut c.shutdown_timeout, a.shutdown_timeout);
                c.http_addr = a.http_addr.or(c.http_addr);
                c.instance_id = a.instance_id.or(c.instance_id);
                Command::Run { pool: a.pool }
            }
            CommandArgs::Stats(a) => Command::Stats {
                pool: a.pool,
                json: a.json,
            },
            CommandArgs::Recycle(a) => Command::Recycle {
                pool: a.pool,
                keys: a.keys,
            },
            CommandArgs::Reserve(a) => Command::Reserve {
                pool: a.pool,
                keys: a.keys,
            },
            CommandArgs::BlocklistAdd(a) => Command::BlocklistAdd {
                pool: a.pool,
                words: blocklist_words(&a.blocklists)?,
            },
        };
        c.validate()?;
        Ok((command, c))
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

/// The folded words of the `--blocklist` sources (`default` or files).
fn blocklist_words(sources: &[String]) -> Result<Vec<String>> {
    use kgs_schemas::blocklist::{Blocklist, DEFAULT_ENGLISH};
    let mut words: Vec<String> = Vec::new();
    for source in sources {
        let text = if source == "default" {
            DEFAULT_ENGLISH.to_owned()
        } else {
            std::fs::read_to_string(source)
                .map_err(|e| Error::Config(format!("reading blocklist {source}: {e}")))?
        };
        words.extend(Blocklist::parse_list(&text).into_iter().map(str::to_owned));
    }
    let list = Blocklist::new(&words).map_err(Error::Config)?;
    Ok(list.words())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clap definition is consistent (no clashing flags or env vars).
    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// A flag overrides the default; a bad alphabet is one config error.
    #[test]
    fn flags_override_defaults() {
        let cli = Cli::parse_from(["kgs-producer", "run", "--pool", "p", "--batch-size", "7"]);
        let (cmd, c) = cli.resolve().unwrap();
        assert!(matches!(cmd, Command::Run { pool } if pool == "p"));
        assert_eq!(c.batch_size, 7);
        let cli = Cli::parse_from([
            "kgs-producer",
            "init",
            "--pool",
            "p",
            "--length",
            "2",
            "--alphabet",
            "aa",
        ]);
        assert!(matches!(cli.resolve(), Err(Error::Config(_))));
    }

    /// `--alphabet-preset` names an alphabet; it excludes `--alphabet`, and
    /// an unknown name is refused by the parser (which lists the names).
    #[test]
    fn alphabet_presets_by_name() {
        let init = |extra: &[&str]| {
            let mut args = vec!["kgs-producer", "init", "--pool", "p", "--length", "3"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        let (cmd, _) = init(&["--alphabet-preset", "lower36"])
            .unwrap()
            .resolve()
            .unwrap();
        let Command::Init { spec, .. } = cmd else {
            panic!("not init: {cmd:?}")
        };
        assert_eq!(
            spec.format.alphabet(),
            kgs_schemas::alphabet_preset("lower36").unwrap()
        );
        let (cmd, _) = init(&[]).unwrap().resolve().unwrap();
        let Command::Init { spec, .. } = cmd else {
            panic!("not init: {cmd:?}")
        };
        assert_eq!(spec.format.alphabet(), BASE62);
        assert!(init(&["--alphabet-preset", "base58", "--alphabet", "ab"]).is_err());
        let err = init(&["--alphabet-preset", "base64"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unambiguous"), "{err}");
    }
}

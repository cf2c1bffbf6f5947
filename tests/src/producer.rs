//! The one way tests start `kgs-producer`: a command for a pool in a
//! database, with the servers, a short lease and no inherited failpoint
//! set once.

use std::path::Path;
use std::process::{Output, Stdio};

use anyhow::{ensure, Context, Result};
use tokio::process::Command;

use crate::env::workspace_binary;

/// The lease of every spawned producer: short, so a standby or a restart
/// after a crash takes over within seconds.
pub const LEASE: &str = "3s";

/// A `kgs-producer` command line (`init`, `run`, `stats`, ...), killed when
/// dropped once spawned.
#[derive(Debug)]
pub struct ProducerCmd {
    cmd: Command,
}

impl ProducerCmd {
    /// `kgs-producer` for pool `pool` in database `db` on the test servers
    /// ([`crate::kafka_brokers`], [`crate::mongodb_uri`]): lease [`LEASE`], 10 s to reach
    /// a server, no `KGS_FAILPOINT` or `KGS_GROUP` from the test's own
    /// environment, stdin closed.
    pub fn new(db: &str, pool: &str) -> Result<Self> {
        Ok(Self::with_binary(
            &workspace_binary("kgs-producer")?,
            db,
            pool,
        ))
    }

    /// [`ProducerCmd::new`] running the binary at `binary`.
    pub fn with_binary(binary: &Path, db: &str, pool: &str) -> Self {
        let mut cmd = crate::process::kgs_command(binary, db, pool);
        cmd.env("KGS_LEASE_DURATION", LEASE)
            .env("KGS_CONNECT_TIMEOUT", "10s")
            .env_remove("KGS_FAILPOINT");
        Self { cmd }
    }

    crate::process::command_builder!("kgs-producer");

    /// `init`: a pool of `length`-character keys (base62 unless `--alphabet`
    /// follows) on a topic of `partitions` partitions.
    pub fn init(self, length: u32, partitions: u32) -> Self {
        self.args(["init", "--length", &length.to_string()])
            .args(["--partitions", &partitions.to_string()])
    }

    /// `run` publishing batches of `batch_size` keys, keeping up to
    /// `high_watermark` unconsumed batches per partition and refilling as
    /// soon as one is consumed (low watermark 1), checked every 100 ms.
    pub fn run(self, batch_size: usize, high_watermark: usize) -> Self {
        self.args(["run", "--batch-size", &batch_size.to_string()])
            .args(["--low-watermark", "1"])
            .args(["--high-watermark", &high_watermark.to_string()])
            .args(["--poll-interval", "100ms"])
    }

    /// Sets `KGS_FAILPOINT` if `failpoint` is given.
    pub fn failpoint(self, failpoint: Option<&str>) -> Self {
        match failpoint {
            Some(f) => self.env("KGS_FAILPOINT", f),
            None => self,
        }
    }

    /// Stdout discarded and the log (stderr) written to `path`, for post-mortems.
    pub fn log_to(self, path: &Path) -> Result<Self> {
        let log =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(self.stdout(Stdio::null()).stderr(log))
    }

    /// Stdout discarded and the log written to a new file of the temp dir
    /// named after `pool`.
    pub fn log_to_temp(self, pool: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("{pool}-{}.log", crate::unique("run")));
        self.log_to(&path)
    }

    /// Runs it to completion; fails with its stderr unless it exits 0.
    pub async fn success(self) -> Result<Output> {
        let out = self.output().await?;
        ensure!(
            out.status.success(),
            "kgs-producer failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    }

    /// The command, for what the methods above do not cover.
    pub fn into_command(self) -> Command {
        self.cmd
    }
}

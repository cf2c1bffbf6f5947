//! The one way tests start `kgs-producer`: a command for a pool in a
//! database, with the servers, a short lease and no inherited failpoint
//! set once; optionally with its host clock shifted (libfaketime).

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, ensure, Context, Result};
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
    /// follows) on a topic of `partitions` partitions, recycled keys back
    /// at once (no quarantine, unless a later `--recycle-cooldown` says so).
    pub fn init(self, length: u32, partitions: u32) -> Self {
        self.args(["init", "--length", &length.to_string()])
            .args(["--partitions", &partitions.to_string()])
            .args(["--recycle-cooldown", "0s"])
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

    /// The process's host clock `secs` seconds ahead of the real one (behind
    /// if negative), as if its host's clock were off: libfaketime preloaded
    /// with a relative `FAKETIME` offset, so every wall-clock read
    /// (`clock_gettime(CLOCK_REALTIME)`, `gettimeofday`, `time`: Rust's
    /// `SystemTime`, chrono, bson, librdkafka) is shifted.
    ///
    /// The monotonic clock is left alone (`FAKETIME_DONT_FAKE_MONOTONIC`): a
    /// host whose wall clock is off still measures intervals right, and
    /// tokio's timers, the lease's local validity and librdkafka's
    /// `rd_clock` run on it. A second preloaded shim routes glibc's C11
    /// `cnd_timedwait`, which librdkafka waits with and which libfaketime
    /// cannot intercept (glibc calls its own condition-variable wait
    /// directly), through `pthread_cond_timedwait`, which libfaketime
    /// translates back to the real clock. Without it librdkafka's timed
    /// waits, whose deadlines it computes from the shifted `gettimeofday`,
    /// are off by the offset: a clock behind makes every wait time out at
    /// once (both cores spinning in futex calls), a clock ahead makes every
    /// idle wait `secs` longer — nothing a real skewed clock does, since
    /// the kernel's clock would agree with the process's.
    ///
    /// Needs Debian's `faketime` package (`scripts/prereqs.sh test`) and a C
    /// compiler (`cc`, which building the workspace needs anyway).
    pub fn clock_offset(self, secs: i64) -> Result<Self> {
        let faketime = libfaketime()?;
        let shim = c11_wait_shim()?;
        Ok(self
            .env(
                "LD_PRELOAD",
                format!("{}:{}", shim.display(), faketime.display()),
            )
            .env("FAKETIME", format!("{secs:+}"))
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1"))
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

/// libfaketime's preload library: where Debian's `libfaketime` (pulled in
/// by `faketime`) puts it for any architecture, or a `make install` from
/// source.
fn libfaketime() -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("faketime"))
                .collect()
        })
        .unwrap_or_default();
    dirs.push("/usr/lib/faketime".into());
    dirs.push("/usr/local/lib/faketime".into());
    dirs.into_iter()
        .map(|d| d.join("libfaketime.so.1"))
        .find(|lib| lib.is_file())
        .context(
            "libfaketime.so.1 not found (in /usr/lib/*/faketime, /usr/lib/faketime, \
             /usr/local/lib/faketime): install it with `apt-get install faketime` \
             (scripts/prereqs.sh test does)",
        )
}

/// The shim's source: glibc's `cnd_timedwait` (C11 threads) as a
/// `pthread_cond_timedwait` call through the dynamic linker, where
/// libfaketime catches it. glibc's `cnd_t` and `mtx_t` are its
/// `pthread_cond_t` and `pthread_mutex_t` (its own `cnd_timedwait` casts
/// them the same way), and a `cnd_init` condition variable waits on
/// `CLOCK_REALTIME`, which is what libfaketime assumes for one it did not
/// see created.
const C11_WAIT_SHIM: &str = r#"#include <errno.h>
#include <pthread.h>
#include <threads.h>

int cnd_timedwait(cnd_t *restrict cond, mtx_t *restrict mtx,
                  const struct timespec *restrict deadline) {
    switch (pthread_cond_timedwait((pthread_cond_t *)cond, (pthread_mutex_t *)mtx, deadline)) {
    case 0: return thrd_success;
    case ETIMEDOUT: return thrd_timedout;
    default: return thrd_error;
    }
}
"#;

/// The shim of [`C11_WAIT_SHIM`], compiled with `cc` once per test process
/// into the temp dir (named after its source, so a changed shim is built
/// again; written under a unique name, then renamed, so concurrent test
/// processes never load a half-written library).
fn c11_wait_shim() -> Result<PathBuf> {
    static SHIM: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    SHIM.get_or_init(|| build_c11_wait_shim().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_c11_wait_shim() -> Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let mut hash = std::collections::hash_map::DefaultHasher::new();
    C11_WAIT_SHIM.hash(&mut hash);
    let dir = std::env::temp_dir();
    let lib = dir.join(format!("kgs-c11-wait-{:016x}.so", hash.finish()));
    if lib.is_file() {
        return Ok(lib);
    }
    let tmp = dir.join(crate::unique("kgs-c11-wait"));
    let source = tmp.with_extension("c");
    std::fs::write(&source, C11_WAIT_SHIM)
        .with_context(|| format!("writing {}", source.display()))?;
    let out = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&tmp)
        .arg(&source)
        .output()
        .context("running cc to build the libfaketime shim (install a C compiler)")?;
    let _ = std::fs::remove_file(&source);
    if !out.status.success() {
        bail!(
            "cc could not build the libfaketime shim: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::rename(&tmp, &lib).with_context(|| format!("moving the shim to {}", lib.display()))?;
    Ok(lib)
}

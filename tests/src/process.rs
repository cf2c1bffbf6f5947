//! Signals to child processes, and the one way tests stop them: a signal,
//! then a bounded wait for the exit.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tokio::process::Child;

/// How long a signalled process may take to exit: the producer's shutdown
/// deadline is 20 s and the consumer's return deadline 10 s, on a loaded
/// 2-core machine.
pub const EXIT_WAIT: Duration = Duration::from_secs(90);

/// The signals the tests send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Graceful stop: producers release the lease, app servers return keys.
    Term,
    /// A crash: nothing is returned or released.
    Kill,
    /// Freezes a process (a zombie leader), until [`Signal::Cont`].
    Stop,
    /// Resumes a stopped process.
    Cont,
}

impl Signal {
    /// The name kill(1) takes.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Term => "TERM",
            Signal::Kill => "KILL",
            Signal::Stop => "STOP",
            Signal::Cont => "CONT",
        }
    }
}

/// Sends `signal` to process `pid` with kill(1) (the workspace forbids
/// `unsafe`, so no libc).
pub fn send_signal(pid: u32, signal: Signal) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args([format!("-{}", signal.name()), pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    ensure!(status.success(), "kill -{} {pid} failed", signal.name());
    Ok(())
}

/// Sends `signal` to `child`.
pub fn signal(child: &Child, signal: Signal) -> Result<()> {
    let pid = child.id().context("the process was already reaped")?;
    send_signal(pid, signal)
}

/// Sends `signal` to `child` and waits up to `within` for its exit:
/// `None` if it is still running then.
pub async fn stop(
    child: &mut Child,
    signal: Signal,
    within: Duration,
) -> Result<Option<ExitStatus>> {
    self::signal(child, signal)?;
    match tokio::time::timeout(within, child.wait()).await {
        Ok(status) => Ok(Some(status?)),
        Err(_) => Ok(None),
    }
}

/// SIGTERM, then the exit status within [`EXIT_WAIT`] (an error if the
/// process is still running then; it is killed when dropped).
pub async fn terminate(mut child: Child) -> Result<ExitStatus> {
    stop(&mut child, Signal::Term, EXIT_WAIT)
        .await?
        .with_context(|| format!("did not exit within {EXIT_WAIT:?} of SIGTERM"))
}

/// The start of every kgs command line of the tests: `binary` for pool
/// `pool` in database `db` on the test servers ([`crate::kafka_brokers`],
/// [`crate::mongodb_uri`]), without the `KGS_GROUP` and `KGS_INSTANCE_ID`
/// of the test's own environment, stdin closed, killed when dropped.
pub(crate) fn kgs_command(
    binary: &std::path::Path,
    db: &str,
    pool: &str,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(binary);
    cmd.env("KGS_KAFKA_BROKERS", crate::kafka_brokers())
        .env("KGS_MONGODB_URI", crate::mongodb_uri())
        .env("KGS_MONGODB_DB", db)
        .env("KGS_POOL", pool)
        .env_remove("KGS_GROUP")
        .env_remove("KGS_INSTANCE_ID")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// The methods both process builders ([`crate::ProducerCmd`],
/// [`crate::AppServerCmd`]) share over their `cmd: Command` field:
/// arguments, environment, other servers, standard streams, spawning and
/// running to completion. `$what` names the process in errors.
macro_rules! command_builder {
    ($what:literal) => {
        /// More arguments (flags override the environment).
        pub fn args<I, S>(mut self, args: I) -> Self
        where
            I: IntoIterator<Item = S>,
            S: AsRef<std::ffi::OsStr>,
        {
            self.cmd.args(args);
            self
        }

        /// Sets an environment variable (overriding the defaults).
        pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
            self.cmd.env(key, value);
            self
        }

        /// Other servers than the test servers (a chaos run's own instance).
        pub fn servers(self, brokers: &str, mongodb_uri: &str) -> Self {
            self.env("KGS_KAFKA_BROKERS", brokers)
                .env("KGS_MONGODB_URI", mongodb_uri)
        }

        /// Where stdin comes from (closed by default).
        pub fn stdin(mut self, stdin: impl Into<std::process::Stdio>) -> Self {
            self.cmd.stdin(stdin);
            self
        }

        /// Where stdout goes.
        pub fn stdout(mut self, stdout: impl Into<std::process::Stdio>) -> Self {
            self.cmd.stdout(stdout);
            self
        }

        /// Where stderr goes.
        pub fn stderr(mut self, stderr: impl Into<std::process::Stdio>) -> Self {
            self.cmd.stderr(stderr);
            self
        }

        /// Starts it (killed when the `Child` is dropped).
        pub fn spawn(mut self) -> anyhow::Result<tokio::process::Child> {
            anyhow::Context::context(self.cmd.spawn(), concat!("spawning ", $what))
        }

        /// Runs it to completion, capturing stdout and stderr.
        pub async fn output(mut self) -> anyhow::Result<std::process::Output> {
            anyhow::Context::context(self.cmd.output().await, concat!("running ", $what))
        }
    };
}
pub(crate) use command_builder;

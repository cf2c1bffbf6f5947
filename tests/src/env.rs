//! Where the servers and the built binaries are, and names unique to a test.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// The app server binary (a bin target of `kgs-consumer`).
pub const APP_SERVER_BIN: &str = "kgs-app-server";

/// Kafka bootstrap servers: `KGS_KAFKA_BROKERS`, default the local test broker.
pub fn kafka_brokers() -> String {
    std::env::var("KGS_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// MongoDB connection string: `KGS_MONGODB_URI`, default the local test server.
pub fn mongodb_uri() -> String {
    std::env::var("KGS_MONGODB_URI")
        .unwrap_or_else(|_| "mongodb://127.0.0.1:27017/?directConnection=true".to_owned())
}

/// A name unique to this test run: `prefix-<8 random hex digits>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// A free loopback `host:port`: bound, then released for a child process.
pub fn free_addr() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    Ok(l.local_addr()?.to_string())
}

/// Path of a binary built from this workspace (`kgs-producer`,
/// [`APP_SERVER_BIN`]) in the running executable's target folder: a test
/// binary lives in `target/<profile>/deps/`, a bin such as `kgs-chaos` in
/// `target/<profile>/`. `make test` builds them before running the tests.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe.parent().context("the executable has no folder")?;
    if dir.ends_with("deps") {
        dir = dir
            .parent()
            .context("deps/ has no target/<profile> folder")?;
    }
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{name} not found in {}: build it first (make test does: cargo build --workspace --bins)",
            dir.display()
        );
    }
    Ok(path)
}

//! What the two kgs binaries (`kgs-producer`, `kgs-app-server`) share as
//! processes: the log-filter variable, the shutdown signals, and the
//! `name=value` grammar of pass-through settings. Behind the `process`
//! feature, so the library users of this crate do not pull in tokio's
//! signal handling or a log subscriber.

use tracing::{error, info};

/// The environment variable that sets the log filter of both binaries
/// (`tracing` `EnvFilter` syntax, e.g. `info,kgs_producer=debug`).
pub const LOG_ENV: &str = "KGS_LOG";

/// Installs the log subscriber of a binary: lines on stderr, filtered by
/// [`LOG_ENV`], else by `default`.
pub fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(LOG_ENV)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on Ctrl-C or SIGTERM, whichever comes first. A signal whose
/// handler cannot be installed is logged and never fires (the other one
/// still does): a service must not shut down just because it could not
/// listen for one of them.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            error!(cause = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                error!(cause = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("Ctrl-C received, shutting down"),
        () = terminate => info!("SIGTERM received, shutting down"),
    }
}

/// Parses one `name=value` setting (a librdkafka option): the name is
/// trimmed and must not be empty; the value is kept as given (it may hold
/// `=`).
pub fn parse_name_value(pair: &str) -> Result<(String, String), String> {
    match pair.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("expected name=value, got {pair:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name is trimmed, the value kept whole; no `=` or no name fails.
    #[test]
    fn name_value_pairs() {
        assert_eq!(
            parse_name_value(" sasl.password =a=b"),
            Ok(("sasl.password".to_owned(), "a=b".to_owned()))
        );
        assert_eq!(
            parse_name_value("acks="),
            Ok(("acks".to_owned(), String::new()))
        );
        assert!(parse_name_value("acks").is_err());
        assert!(parse_name_value("=1").is_err());
    }
}

//! The one HTTP client of the tests: one HTTP/1.0 request per connection
//! (the server closes it, so the body ends at EOF), bounded in time.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one request may take: a hung server fails the test with a
/// clear message instead of hanging it.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// One request (no body) to a kgs process: `(status, body)`, within
/// [`HTTP_TIMEOUT`].
pub async fn http(addr: &str, method: &str, path: &str) -> Result<(u16, String)> {
    http_within(addr, method, path, HTTP_TIMEOUT).await
}

/// `GET path`: `(status, body)`.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    http(addr, "GET", path).await
}

/// [`http`] bounded by `timeout` instead of [`HTTP_TIMEOUT`].
pub async fn http_within(
    addr: &str,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    http_request(addr, method, path, &[], timeout).await
}

/// One request with extra `headers`, bounded by `timeout`.
pub async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<(u16, String)> {
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}\r\n").as_bytes())
            .await?;
        let mut response = String::new();
        s.read_to_string(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(timeout, request)
        .await
        .with_context(|| format!("{method} {addr}{path} timed out"))??;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{method} {addr}{path}: no HTTP status line"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// `s` with every byte but the unreserved ones (`A-Z a-z 0-9 - . _ ~`,
/// RFC 3986) percent-encoded: safe as one URL path segment (keys of any
/// alphabet, `/`, `%`, `?`, `#` included, reach the server intact) or as a
/// query parameter value.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

//! A TCP proxy of the tests' own between kgs processes and a server, on
//! loopback only: the slow and broken networks that a SIGSTOP does not
//! model. A paused process stops everything; on a stalled network the
//! process keeps running (its timers fire, its driver times out and
//! retries) while the requests it already sent sit in the network and land
//! later, after a takeover, exactly as a stale leader's writes would.
//!
//! Every connection accepted is forwarded to one target. The [`Mode`] is
//! changed at any time and applies to bytes already held:
//! - [`Mode::Pass`]: bytes pass in order, each chunk `delay` after it was read;
//! - [`Mode::Stall`]: bytes are still read from both sides but held, and
//!   delivered in order once the mode passes again (nothing is lost: a
//!   request a client gave up on still reaches the server);
//! - [`Mode::Down`]: every connection is closed, held bytes are dropped, and
//!   new connections are accepted and closed at once (a server outage as
//!   the client sees it).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What the proxy does with the bytes of every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward each chunk `delay` after it was read (zero: at once).
    Pass { delay: Duration },
    /// Hold every byte read; deliver them when the mode passes again.
    Stall,
    /// Close every connection and refuse (accept and close) new ones.
    Down,
}

impl Mode {
    /// Pass without delay.
    pub const OPEN: Mode = Mode::Pass {
        delay: Duration::ZERO,
    };
}

/// A running proxy; stopped (every connection closed) when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    connections: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// A proxy to `target` on a free loopback port.
    pub async fn start(target: SocketAddr) -> Result<Self> {
        Self::start_on(0, target).await
    }

    /// A proxy to `target` listening on `127.0.0.1:port` (0: a free port).
    /// Both ends are loopback: a test never sends traffic elsewhere.
    pub async fn start_on(port: u16, target: SocketAddr) -> Result<Self> {
        ensure!(
            target.ip().is_loopback(),
            "proxy target {target} is not a loopback address"
        );
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            .await
            .with_context(|| format!("proxy: binding 127.0.0.1:{port}"))?;
        let addr = listener.local_addr()?;
        let (mode, watching) = watch::channel(Mode::OPEN);
        let connections = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&connections);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *watching.borrow() == Mode::Down {
                    drop(client);
                    continue;
                }
                counted.fetch_add(1, Ordering::Relaxed);
                let _ = client.set_nodelay(true);
                tokio::spawn(forward(client, target, watching.clone()));
            }
        });
        Ok(Self {
            addr,
            mode,
            connections,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Changes what happens to every byte from now on, held ones included.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Connections accepted and forwarded so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.mode.send_replace(Mode::Down);
        self.accept.abort();
    }
}

/// Forwards one connection both ways until both sides are done or the
/// proxy goes down.
async fn forward(client: TcpStream, target: SocketAddr, mode: watch::Receiver<Mode>) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let both = async {
        tokio::join!(
            pump(client_read, server_write, mode.clone()),
            pump(server_read, client_write, mode.clone()),
        )
    };
    // Down drops all four halves, which closes both sockets.
    tokio::select! {
        _ = both => {}
        () = down(mode.clone()) => {}
    }
}

/// Resolves once the mode is [`Mode::Down`] (or the proxy is gone).
async fn down(mut mode: watch::Receiver<Mode>) {
    let _ = mode.wait_for(|m| *m == Mode::Down).await;
}

/// One direction: reads chunks as they come (so a stalled peer does not
/// block the sender) and writes each when the mode lets it through.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut mode: watch::Receiver<Mode>) {
    let (held, mut next) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if held.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        // Dropping `held` ends the writer once it delivered everything.
    };
    let write = async move {
        while let Some((read_at, chunk)) = next.recv().await {
            loop {
                let now = *mode.borrow_and_update();
                match now {
                    Mode::Down => return,
                    Mode::Stall => {
                        if mode.changed().await.is_err() {
                            return;
                        }
                    }
                    Mode::Pass { delay } => {
                        tokio::select! {
                            () = tokio::time::sleep_until(read_at + delay) => break,
                            changed = mode.changed() => if changed.is_err() { return },
                        }
                    }
                }
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// A proxy to the MongoDB server of `uri` (one `host:port`, loopback), and
/// `uri` pointing at the proxy instead. The URI must connect directly
/// (`directConnection=true`, as the test URIs do): a replica-set client
/// would find the server's own address in its answers and go around.
pub async fn proxied_mongodb_uri(uri: &str) -> Result<(Proxy, String)> {
    let rest = uri
        .strip_prefix("mongodb://")
        .with_context(|| format!("{uri:?} is not a mongodb:// URI"))?;
    let host_start = rest.find('@').map_or(0, |at| at + 1);
    let host_len = rest[host_start..]
        .find(['/', '?'])
        .unwrap_or(rest.len() - host_start);
    let host = &rest[host_start..host_start + host_len];
    ensure!(!host.contains(','), "{uri:?} names more than one server");
    ensure!(
        uri.contains("directConnection=true"),
        "{uri:?} lacks directConnection=true"
    );
    let target = tokio::net::lookup_host(host)
        .await
        .with_context(|| format!("resolving {host}"))?
        .find(|a| a.is_ipv4())
        .with_context(|| format!("{host} has no IPv4 address"))?;
    let proxy = Proxy::start(target).await?;
    let proxied = format!(
        "mongodb://{}{}{}",
        &rest[..host_start],
        proxy.addr(),
        &rest[host_start + host_len..]
    );
    Ok((proxy, proxied))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback.
    async fn echo() -> Result<SocketAddr> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Ok(addr)
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await?;
        Ok(got)
    }

    #[tokio::test]
    async fn rewrites_a_mongodb_uri() -> Result<()> {
        let (proxy, uri) =
            proxied_mongodb_uri("mongodb://u:p@127.0.0.1:27017/?directConnection=true&tls=true")
                .await?;
        assert_eq!(
            uri,
            format!(
                "mongodb://u:p@{}/?directConnection=true&tls=true",
                proxy.addr()
            )
        );
        assert!(proxied_mongodb_uri("mongodb://127.0.0.1:27017/")
            .await
            .is_err());
        Ok(())
    }

    #[tokio::test]
    async fn refuses_a_target_off_loopback() {
        let err = Proxy::start("10.0.0.1:27017".parse().unwrap())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a loopback"), "{err}");
    }

    #[tokio::test]
    async fn passes_delays_stalls_and_goes_down() -> Result<()> {
        let proxy = Proxy::start(echo().await?).await?;
        let mut s = TcpStream::connect(proxy.addr()).await?;
        assert_eq!(round_trip(&mut s, b"hello").await?, b"hello");
        assert_eq!(proxy.connections(), 1);

        // Delayed: the answer takes at least the delay of both directions.
        proxy.set(Mode::Pass {
            delay: Duration::from_millis(150),
        });
        let t = std::time::Instant::now();
        assert_eq!(round_trip(&mut s, b"slow").await?, b"slow");
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );

        // Stalled: held, not lost; delivered in order on resume.
        proxy.set(Mode::Stall);
        s.write_all(b"held-1 ").await?;
        s.write_all(b"held-2").await?;
        let mut got = vec![0u8; 13];
        let early = tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut got)).await;
        assert!(early.is_err(), "bytes passed a stalled proxy");
        proxy.set(Mode::OPEN);
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await??;
        assert_eq!(got, b"held-1 held-2");

        // Down: the connection is closed and a new one is closed at once.
        proxy.set(Mode::Down);
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await?;
        assert!(matches!(n, Ok(0) | Err(_)), "still open: {n:?}");
        let mut again = TcpStream::connect(proxy.addr()).await?;
        let n = tokio::time::timeout(Duration::from_secs(5), again.read(&mut buf)).await?;
        assert!(matches!(n, Ok(0) | Err(_)), "accepted while down: {n:?}");

        // Up again: new connections pass.
        proxy.set(Mode::OPEN);
        let mut s = TcpStream::connect(proxy.addr()).await?;
        assert_eq!(round_trip(&mut s, b"back").await?, b"back");
        Ok(())
    }
}

//! `kgs-load`: a constant-rate HTTP load of `GET /keys` (an open model, as
//! vegeta's constant pacer: request `i` is due at `start + i / rate`,
//! whether or not earlier ones have been answered, and its latency counts
//! from when it was due, so a slow server cannot slow the offered load
//! down). Every `200` body is a key; the run ends with one summary line per
//! figure and fails (exit 1) if any key was served twice.
//!
//! ```text
//! kgs-load --addr 127.0.0.1:8080 --rate 3000 --duration 60s --warmup 5s
//! ```
//! Plain HTTP/1.1 keep-alive on `--connections` sockets; no dependency
//! beyond tokio, so it builds with the workspace.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// Offers GET /keys at a fixed rate and counts statuses and duplicate keys.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The app server, host:port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Requests per second offered.
    #[arg(long, default_value_t = 3000)]
    rate: u64,
    /// How long to offer them, e.g. `60s`.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// The first part of the run left out of the non-200 share, e.g. `5s`.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    warmup: Duration,
    /// Keep-alive connections (requests due while all are busy wait).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Path requested.
    #[arg(long, default_value = "/keys")]
    path: String,
    /// Also write every served key here, one per line.
    #[arg(long)]
    keys_out: Option<std::path::PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration {s:?} (use ms, s or m)")),
    }
}

#[derive(Default)]
struct Tally {
    ok: u64,
    other: u64,
    errors: u64,
    /// Non-200 answers (and errors) after the warm-up.
    late_bad: u64,
    late_total: u64,
    latencies_us: Vec<u64>,
    keys: Vec<String>,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("kgs-load: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    if args.rate == 0 {
        bail!("--rate must be at least 1");
    }
    let total = args.rate * args.duration.as_secs_f64() as u64;
    let (tx, rx) = async_channel(total as usize);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now() + Duration::from_millis(100);
    let mut workers = Vec::new();
    for _ in 0..args.connections {
        let rx = rx.clone();
        let tally = tally.clone();
        let addr = args.addr.clone();
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: keep-alive\r\n\r\n",
            args.path, args.addr
        );
        let warmup = args.warmup;
        workers.push(tokio::spawn(async move {
            let mut conn: Option<BufReader<TcpStream>> = None;
            while let Ok(due) = rx.recv().await {
                let result = request_once(&mut conn, &addr, &request).await;
                let latency = due.elapsed();
                let late = due.duration_since(start) >= warmup;
                let mut t = tally.lock().await;
                t.latencies_us.push(latency.as_micros() as u64);
                if late {
                    t.late_total += 1;
                }
                match result {
                    Ok((200, body)) => {
                        t.ok += 1;
                        t.keys.push(body.trim_end().to_owned());
                    }
                    Ok(_) => {
                        t.other += 1;
                        if late {
                            t.late_bad += 1;
                        }
                    }
                    Err(_) => {
                        conn = None;
                        t.errors += 1;
                        if late {
                            t.late_bad += 1;
                        }
                    }
                }
            }
        }));
    }
    drop(rx);
    // The pacer: request i is due at start + i / rate.
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / args.rate as f64);
        tokio::time::sleep_until(due.into()).await;
        tx.send(due).await.ok();
    }
    drop(tx);
    let offered_for = start.elapsed();
    for w in workers {
        w.await?;
    }
    let took = start.elapsed();
    let t = tally.lock().await;
    let mut lat = t.latencies_us.clone();
    lat.sort_unstable();
    let pct = |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)));
    let distinct: HashSet<&String> = t.keys.iter().collect();
    let duplicates = t.keys.len() - distinct.len();
    let bad_share = t.late_bad as f64 / t.late_total.max(1) as f64 * 100.0;
    println!(
        "offered        {total} requests at {} /s over {:.1} s (all answered after {:.1} s)",
        args.rate,
        offered_for.as_secs_f64(),
        took.as_secs_f64()
    );
    println!("answered 200   {}", t.ok);
    println!("answered other {}", t.other);
    println!("errors         {}", t.errors);
    println!(
        "non-200 after warm-up {:.2}% ({} of {})",
        bad_share, t.late_bad, t.late_total
    );
    println!(
        "latency ms     p50 {:.2}  p99 {:.2}  max {:.2}",
        pct(0.50).copied().unwrap_or(0) as f64 / 1e3,
        pct(0.99).copied().unwrap_or(0) as f64 / 1e3,
        lat.last().copied().unwrap_or(0) as f64 / 1e3
    );
    println!("duplicate keys {duplicates}");
    if let Some(path) = &args.keys_out {
        std::fs::write(path, t.keys.join("\n") + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if duplicates > 0 {
        bail!("{duplicates} keys were served twice");
    }
    Ok(())
}

/// A bounded multi-consumer queue of due times (tokio's mpsc has one
/// receiver; workers share it behind a mutex).
fn async_channel(cap: usize) -> (Sender, Receiver) {
    let (tx, rx) = tokio::sync::mpsc::channel(cap.max(1));
    (Sender(tx), Receiver(Arc::new(Mutex::new(rx))))
}

struct Sender(tokio::sync::mpsc::Sender<Instant>);

impl Sender {
    async fn send(&self, due: Instant) -> Result<()> {
        self.0
            .send(due)
            .await
            .map_err(|_| anyhow::anyhow!("closed"))
    }
}

#[derive(Clone)]
struct Receiver(Arc<Mutex<tokio::sync::mpsc::Receiver<Instant>>>);

impl Receiver {
    async fn recv(&self) -> Result<Instant, ()> {
        self.0.lock().await.recv().await.ok_or(())
    }
}

/// One request on the connection (opened if needed); the status and body.
async fn request_once(
    conn: &mut Option<BufReader<TcpStream>>,
    addr: &str,
    request: &str,
) -> Result<(u16, String)> {
    if conn.is_none() {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        *conn = Some(BufReader::new(stream));
    }
    let c = conn.as_mut().expect("just set");
    c.get_mut().write_all(request.as_bytes()).await?;
    let mut line = String::new();
    c.read_line(&mut line).await?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let mut length = 0usize;
    loop {
        line.clear();
        if c.read_line(&mut line).await? == 0 {
            bail!("connection closed");
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().context("content-length")?;
            }
        }
    }
    let mut body = vec![0; length];
    c.read_exact(&mut body).await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

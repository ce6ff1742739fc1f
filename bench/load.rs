//! tierproxy's own load driver (the hot-key benchmark of issue 4; see bench/README.md).
//!
//! `cargo run --release --example load -- --addr 127.0.0.1:6380 [options]`
//!
//! Modes:
//! - `prefill`: SET every key once (values of random size in [value-min, value-max]).
//! - `zipf`: pipelined connections, keys drawn from a zipf(s) distribution over `keys`,
//!   `read-ratio` GETs and the rest SETs, for `duration-secs`; prints throughput and
//!   latency percentiles (per pipelined batch, attributed to each request in it).
//! - `staleness`: `trials` times, write a fresh value through `--writer` (another proxy,
//!   or Redis directly) and poll `--addr` until it returns it; prints the distribution of
//!   the time from the write's acknowledgement to the first read of the new value.
//!
//! Output is one `key=value` line (easy to parse from shell) plus a readable summary.

use std::time::{Duration, Instant};

use clap::Parser;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Debug, Clone)]
struct Args {
    #[arg(long, default_value = "zipf")]
    mode: String,
    #[arg(long, default_value = "127.0.0.1:6380")]
    addr: String,
    /// For `staleness`: where the writes go.
    #[arg(long)]
    writer: Option<String>,
    #[arg(long, default_value_t = 50)]
    conns: usize,
    #[arg(long, default_value_t = 16)]
    pipeline: usize,
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    #[arg(long, default_value_t = 100_000)]
    keys: usize,
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    #[arg(long, default_value_t = 0.9)]
    read_ratio: f64,
    #[arg(long, default_value_t = 100)]
    value_min: usize,
    #[arg(long, default_value_t = 1024)]
    value_max: usize,
    #[arg(long, default_value = "bench:")]
    prefix: String,
    #[arg(long, default_value_t = 1000)]
    trials: usize,
}

/// Inverse-CDF zipf sampler over ranks 0..n (rank 0 is the hottest key).
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for k in 1..=n {
            sum += 1.0 / (k as f64).powf(s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.gen();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

fn encode(args: &[&[u8]], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Length of one complete RESP2 reply at the start of `buf`, if complete.
fn reply_len(buf: &[u8]) -> Option<usize> {
    let mut pos = 0;
    let mut pending = 1i64;
    while pending > 0 {
        let eol = buf.get(pos..)?.windows(2).position(|w| w == b"\r\n")? + pos;
        let tag = *buf.get(pos)?;
        let n: i64 = std::str::from_utf8(&buf[pos + 1..eol])
            .ok()?
            .parse()
            .unwrap_or(0);
        pending -= 1;
        pos = eol + 2;
        match tag {
            b'$' if n >= 0 => {
                pos += n as usize + 2;
                if pos > buf.len() {
                    return None;
                }
            }
            b'*' if n > 0 => pending += n,
            _ => {}
        }
    }
    Some(pos)
}

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn connect(addr: &str) -> Conn {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).ok();
        Conn {
            s,
            buf: Vec::with_capacity(64 * 1024),
        }
    }

    /// Sends `out` and reads `n` replies; returns them (raw) and the error count.
    async fn round(&mut self, out: &[u8], n: usize) -> (Vec<Vec<u8>>, usize) {
        self.s.write_all(out).await.expect("write");
        let mut replies = Vec::with_capacity(n);
        let mut errors = 0;
        while replies.len() < n {
            if let Some(len) = reply_len(&self.buf) {
                let r: Vec<u8> = self.buf.drain(..len).collect();
                if r.first() == Some(&b'-') {
                    errors += 1;
                }
                replies.push(r);
                continue;
            }
            let mut chunk = [0u8; 64 * 1024];
            let got = self.s.read(&mut chunk).await.expect("read");
            assert!(got > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..got]);
        }
        (replies, errors)
    }
}

fn value(rng: &mut impl Rng, a: &Args) -> Vec<u8> {
    let len = rng.gen_range(a.value_min..=a.value_max.max(a.value_min));
    vec![b'v'; len]
}

async fn prefill(a: &Args) {
    let mut c = Conn::connect(&a.addr).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for chunk in (0..a.keys).collect::<Vec<_>>().chunks(1000) {
        let mut out = Vec::new();
        for i in chunk {
            let k = format!("{}{i}", a.prefix);
            let v = value(&mut rng, a);
            encode(&[b"SET", k.as_bytes(), &v], &mut out);
        }
        let (_, errors) = c.round(&out, chunk.len()).await;
        assert_eq!(errors, 0, "errors during prefill");
    }
    println!("mode=prefill keys={}", a.keys);
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn zipf(a: Args) {
    let z = std::sync::Arc::new(Zipf::new(a.keys, a.zipf));
    let deadline = Instant::now() + Duration::from_secs(a.duration_secs);
    let mut tasks = Vec::new();
    for id in 0..a.conns {
        let (a, z) = (a.clone(), z.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::connect(&a.addr).await;
            let mut rng = rand::rngs::StdRng::seed_from_u64(id as u64 + 7);
            let (mut reads, mut writes, mut errors) = (0u64, 0u64, 0u64);
            let mut lat = Vec::new();
            let mut out = Vec::with_capacity(a.pipeline * 64);
            while Instant::now() < deadline {
                out.clear();
                for _ in 0..a.pipeline {
                    let k = format!("{}{}", a.prefix, z.sample(&mut rng));
                    if rng.gen_bool(a.read_ratio) {
                        encode(&[b"GET", k.as_bytes()], &mut out);
                        reads += 1;
                    } else {
                        let v = value(&mut rng, &a);
                        encode(&[b"SET", k.as_bytes(), &v], &mut out);
                        writes += 1;
                    }
                }
                let t = Instant::now();
                let (_, e) = c.round(&out, a.pipeline).await;
                lat.push(t.elapsed().as_micros() as u64);
                errors += e as u64;
            }
            (reads, writes, errors, lat)
        }));
    }
    let start = Instant::now();
    let (mut reads, mut writes, mut errors, mut lat) = (0, 0, 0, Vec::new());
    for t in tasks {
        let (r, w, e, l) = t.await.expect("task");
        reads += r;
        writes += w;
        errors += e;
        lat.extend(l);
    }
    let secs = start.elapsed().as_secs_f64().max(a.duration_secs as f64);
    lat.sort_unstable();
    let ops = (reads + writes) as f64 / secs;
    println!(
        "mode=zipf ops_per_sec={ops:.0} reads={reads} writes={writes} errors={errors} p50_us={} p99_us={} p999_us={} conns={} pipeline={}",
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        pct(&lat, 0.999),
        a.conns,
        a.pipeline
    );
}

async fn staleness(a: Args) {
    let writer = a
        .writer
        .clone()
        .expect("--writer is required for staleness");
    let mut w = Conn::connect(&writer).await;
    let mut r = Conn::connect(&a.addr).await;
    let key = format!("{}stale", a.prefix);
    let mut out = Vec::new();
    let mut windows = Vec::with_capacity(a.trials);
    for trial in 0..a.trials {
        let v = format!("t{trial}");
        let want = format!("${}\r\n{v}\r\n", v.len()).into_bytes();
        // Make sure the reader's L1 holds the previous value first.
        out.clear();
        encode(&[b"GET", key.as_bytes()], &mut out);
        encode(&[b"GET", key.as_bytes()], &mut out);
        r.round(&out, 2).await;
        out.clear();
        encode(&[b"SET", key.as_bytes(), v.as_bytes()], &mut out);
        w.round(&out, 1).await;
        let acked = Instant::now();
        out.clear();
        encode(&[b"GET", key.as_bytes()], &mut out);
        loop {
            let (replies, _) = r.round(&out, 1).await;
            if replies[0] == want {
                break;
            }
            assert!(
                acked.elapsed() < Duration::from_secs(5),
                "trial {trial}: stale for 5 s"
            );
        }
        windows.push(acked.elapsed().as_micros() as u64);
    }
    windows.sort_unstable();
    let stale = windows.iter().filter(|&&w| w > 0).count();
    println!(
        "mode=staleness trials={} p50_us={} p90_us={} p99_us={} max_us={} nonzero={stale}",
        a.trials,
        pct(&windows, 0.5),
        pct(&windows, 0.9),
        pct(&windows, 0.99),
        windows.last().copied().unwrap_or(0),
    );
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    match a.mode.as_str() {
        "prefill" => prefill(&a).await,
        "zipf" => zipf(a).await,
        "staleness" => staleness(a).await,
        other => {
            eprintln!("unknown --mode {other:?} (prefill|zipf|staleness)");
            std::process::exit(2);
        }
    }
}

//! SLOWLOG: commands slower than `slowlog.log_slower_than_us`, measured at the proxy from
//! the command's parse to its reply (what the client waited, including the upstream),
//! kept in a bounded ring in Redis's entry format. Threshold and length are reloadable.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::config::SlowlogConfig;
use crate::error::Error;
use crate::respond::Value;

/// Redis's limits on what one entry keeps of the command.
const MAX_ARGS: usize = 32;
const MAX_ARG_BYTES: usize = 128;

pub struct Entry {
    id: u64,
    unix_secs: i64,
    micros: u64,
    args: Vec<Bytes>,
    client_addr: String,
    client_name: String,
}

pub struct SlowLog {
    threshold_us: AtomicI64,
    max_len: AtomicUsize,
    next_id: AtomicU64,
    entries: Mutex<VecDeque<Entry>>,
}

impl SlowLog {
    pub fn new(cfg: &SlowlogConfig) -> SlowLog {
        let log = SlowLog {
            threshold_us: AtomicI64::new(0),
            max_len: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            entries: Mutex::new(VecDeque::new()),
        };
        log.configure(cfg);
        log
    }

    /// Applies (re)loaded settings; a shorter max_len drops the oldest entries now.
    pub fn configure(&self, cfg: &SlowlogConfig) {
        self.threshold_us
            .store(cfg.log_slower_than_us, Ordering::Relaxed);
        self.max_len.store(cfg.max_len, Ordering::Relaxed);
        let mut e = self.lock();
        while e.len() > cfg.max_len {
            e.pop_back();
        }
    }

    /// Whether commands are being timed for the log at all (threshold ≥ 0).
    pub fn enabled(&self) -> bool {
        self.threshold_us.load(Ordering::Relaxed) >= 0
    }

    /// Whether a command that took `micros` belongs in the log.
    pub fn is_slow(&self, micros: u64) -> bool {
        let t = self.threshold_us.load(Ordering::Relaxed);
        t >= 0 && micros >= t as u64 && self.max_len.load(Ordering::Relaxed) > 0
    }

    pub fn record(&self, micros: u64, args: &[Bytes], client_addr: String, client_name: String) {
        let secret = secret_positions(args);
        let mut kept: Vec<Bytes> = Vec::with_capacity(args.len().min(MAX_ARGS));
        for (i, a) in args.iter().enumerate() {
            if secret.contains(&i) {
                kept.push(Bytes::from_static(b"(redacted)"));
                continue;
            }
            if i == MAX_ARGS - 1 && args.len() > MAX_ARGS {
                kept.push(Bytes::from(format!(
                    "... ({} more arguments)",
                    args.len() - i
                )));
                break;
            }
            // Copied: a slice would keep the client's whole input buffer alive.
            if a.len() > MAX_ARG_BYTES {
                let mut b = a[..MAX_ARG_BYTES].to_vec();
                b.extend_from_slice(
                    format!("... ({} more bytes)", a.len() - MAX_ARG_BYTES).as_bytes(),
                );
                kept.push(Bytes::from(b));
            } else {
                kept.push(Bytes::copy_from_slice(a));
            }
        }
        let entry = Entry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            unix_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            micros,
            args: kept,
            client_addr,
            client_name,
        };
        crate::metrics::SLOW_LOGGED.fetch_add(1, Ordering::Relaxed);
        let max = self.max_len.load(Ordering::Relaxed);
        let mut e = self.lock();
        e.push_front(entry);
        while e.len() > max {
            e.pop_back();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `SLOWLOG GET|LEN|RESET|HELP` (`sub` is `slowlog|get`, …; arity already checked).
    pub fn command(&self, sub: &str, a: &[Bytes]) -> Value {
        match sub {
            "slowlog|len" => Value::Int(self.lock().len() as i64),
            "slowlog|reset" => {
                self.lock().clear();
                Value::ok()
            }
            "slowlog|get" => {
                if a.len() > 3 {
                    return Error::syntax().to_reply();
                }
                let count = match a.get(2) {
                    None => 10,
                    Some(c) => match std::str::from_utf8(c)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                    {
                        Some(n) if n >= -1 => n,
                        Some(_) => {
                            return Error::redis("ERR count should be greater than or equal to -1")
                                .to_reply()
                        }
                        None => {
                            return Error::redis("ERR value is not an integer or out of range")
                                .to_reply()
                        }
                    },
                };
                let e = self.lock();
                let n = if count == -1 {
                    e.len()
                } else {
                    (count as usize).min(e.len())
                };
                Value::Array(
                    e.iter()
                        .take(n)
                        .map(|x| {
                            Value::Array(vec![
                                Value::Int(x.id as i64),
                                Value::Int(x.unix_secs),
                                Value::Int(x.micros as i64),
                                Value::Array(x.args.iter().cloned().map(Value::Bulk).collect()),
                                Value::bulk_str(&x.client_addr),
                                Value::bulk_str(&x.client_name),
                            ])
                        })
                        .collect(),
                )
            }
            "slowlog|help" => Value::Array(
                [
                    "SLOWLOG <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                    "GET [<count>]",
                    "    Return top <count> entries from the slowlog (default: 10, -1 mean all).",
                    "    Entries are made of:",
                    "    id, timestamp, time in microseconds, arguments array, client IP and port,",
                    "    client name",
                    "    (time is measured at tierproxy: from the command's parse to its reply)",
                    "LEN",
                    "    Return the length of the slowlog.",
                    "RESET",
                    "    Reset the slowlog.",
                    "HELP",
                    "    Print this help.",
                ]
                .iter()
                .map(|l| Value::SimpleOwned((*l).into()))
                .collect(),
            ),
            _ => Error::unknown_subcommand(a.get(1).map_or(&b""[..], |b| &b[..]), "slowlog")
                .to_reply(),
        }
    }
}

/// Arguments Redis 7 redacts in its slow log: passwords of AUTH, HELLO … AUTH and
/// MIGRATE … AUTH/AUTH2, and ACL SETUSER rules.
fn secret_positions(args: &[Bytes]) -> Vec<usize> {
    let name = args
        .first()
        .map(|a| a.to_ascii_lowercase())
        .unwrap_or_default();
    let is = |i: usize, w: &str| {
        args.get(i)
            .is_some_and(|a| a.eq_ignore_ascii_case(w.as_bytes()))
    };
    match &name[..] {
        b"auth" => (1..args.len()).collect(),
        b"hello" => match (2..args.len()).find(|&i| is(i, "auth")) {
            Some(i) => vec![i + 1, i + 2],
            None => Vec::new(),
        },
        b"migrate" => match (6..args.len()).find(|&i| is(i, "auth") || is(i, "auth2")) {
            Some(i) if is(i, "auth2") => vec![i + 1, i + 2],
            Some(i) => vec![i + 1],
            None => Vec::new(),
        },
        b"acl" if is(1, "setuser") => (3..args.len()).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::request::args;

    #[test]
    fn bounded_truncated_newest_first() {
        let log = SlowLog::new(&SlowlogConfig {
            log_slower_than_us: 100,
            max_len: 2,
        });
        assert!(!log.is_slow(99));
        assert!(log.is_slow(100));
        let long = "x".repeat(200);
        let many: Vec<String> = (0..40).map(|i| i.to_string()).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        log.record(150, &args(&["set", "k", &long]), "a".into(), "".into());
        log.record(250, &args(&many), "b".into(), "n".into());
        log.record(350, &args(&["get", "k"]), "c".into(), "".into());
        let e = log.lock();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].micros, 350);
        assert_eq!(e[1].args.len(), MAX_ARGS);
        assert_eq!(&e[1].args[MAX_ARGS - 1][..], b"... (9 more arguments)");
        drop(e);
        log.configure(&SlowlogConfig {
            log_slower_than_us: -1,
            max_len: 1,
        });
        assert!(!log.enabled());
        assert_eq!(log.lock().len(), 1);
        let log = SlowLog::new(&SlowlogConfig {
            log_slower_than_us: 0,
            max_len: 8,
        });
        log.record(1, &args(&["set", "k", &long]), "a".into(), "".into());
        log.record(1, &args(&["auth", "app", "s3cret"]), "a".into(), "".into());
        log.record(
            1,
            &args(&["hello", "3", "AUTH", "app", "s3cret", "SETNAME", "x"]),
            "a".into(),
            "".into(),
        );
        let e = log.lock();
        assert_eq!(e[2].args[2].len(), 128 + "... (72 more bytes)".len());
        assert_eq!(e[1].args, args(&["auth", "(redacted)", "(redacted)"]));
        assert_eq!(
            e[0].args,
            args(&[
                "hello",
                "3",
                "AUTH",
                "(redacted)",
                "(redacted)",
                "SETNAME",
                "x"
            ])
        );
    }
}

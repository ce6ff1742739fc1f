//! LCS computed by the proxy, for values Redis cannot see (they are spilled). The same
//! dynamic programme, walk and reply shapes as Redis's `lcsCommand`, so the answer is
//! the one Redis would give for the original values; bounded in memory.

use bytes::Bytes;

use crate::error::Error;
use crate::respond::Value;

/// Largest DP table (cells of 4 bytes) the proxy builds: 64 Mi cells, 256 MiB.
pub const MAX_CELLS: u64 = 64 * 1024 * 1024;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub len: bool,
    pub idx: bool,
    pub withmatchlen: bool,
    pub minmatchlen: i64,
}

/// Parses LCS's options (arguments after the two keys), with Redis's errors.
pub fn options(args: &[Bytes]) -> Result<Options, Error> {
    let mut o = Options::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let more = i + 1 < args.len();
        if a.eq_ignore_ascii_case(b"IDX") {
            o.idx = true;
        } else if a.eq_ignore_ascii_case(b"LEN") {
            o.len = true;
        } else if a.eq_ignore_ascii_case(b"WITHMATCHLEN") {
            o.withmatchlen = true;
        } else if a.eq_ignore_ascii_case(b"MINMATCHLEN") && more {
            let n = std::str::from_utf8(&args[i + 1])
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| Error::redis("ERR value is not an integer or out of range"))?;
            o.minmatchlen = n.max(0);
            i += 1;
        } else {
            return Err(Error::syntax());
        }
        i += 1;
    }
    if o.idx && o.len {
        return Err(Error::redis(
            "ERR If you want both the length and indexes, please just use IDX.",
        ));
    }
    Ok(o)
}

/// Redis's LCS reply for `a` and `b`.
pub fn lcs(a: &[u8], b: &[u8], o: Options) -> Result<Value, Error> {
    let (alen, blen) = (a.len(), b.len());
    let cells = (alen as u64 + 1) * (blen as u64 + 1);
    if cells > MAX_CELLS {
        return Err(Error::proxy(format!(
            "LCS of values of {alen} and {blen} bytes needs a {} MiB table (limit {} MiB)",
            cells * 4 / (1024 * 1024),
            MAX_CELLS * 4 / (1024 * 1024)
        )));
    }
    let w = blen + 1;
    let mut dp = vec![0u32; cells as usize];
    for i in 1..=alen {
        for j in 1..=blen {
            dp[i * w + j] = if a[i - 1] == b[j - 1] {
                dp[(i - 1) * w + j - 1] + 1
            } else {
                dp[(i - 1) * w + j].max(dp[i * w + j - 1])
            };
        }
    }
    let total = dp[alen * w + blen] as usize;
    let compute = o.idx || !o.len;
    let mut result = vec![0u8; if compute { total } else { 0 }];
    let mut matches = Vec::new();
    let (mut i, mut j, mut idx) = (alen, blen, total);
    // "No range yet" is arange_start == alen, as in Redis.
    let (mut a_start, mut a_end, mut b_start, mut b_end) = (alen, 0usize, 0usize, 0usize);
    while compute && i > 0 && j > 0 {
        let mut emit = false;
        if a[i - 1] == b[j - 1] {
            result[idx - 1] = a[i - 1];
            if a_start == alen {
                (a_start, a_end, b_start, b_end) = (i - 1, i - 1, j - 1, j - 1);
            } else if a_start == i && b_start == j {
                a_start -= 1;
                b_start -= 1;
            } else {
                emit = true;
            }
            if a_start == 0 || b_start == 0 {
                emit = true;
            }
            idx -= 1;
            i -= 1;
            j -= 1;
        } else {
            if dp[(i - 1) * w + j] > dp[i * w + j - 1] {
                i -= 1;
            } else {
                j -= 1;
            }
            if a_start != alen {
                emit = true;
            }
        }
        if emit {
            let len = (a_end - a_start + 1) as i64;
            if o.minmatchlen == 0 || len >= o.minmatchlen {
                let pair = |s: usize, e: usize| {
                    Value::Array(vec![Value::Int(s as i64), Value::Int(e as i64)])
                };
                let mut m = vec![pair(a_start, a_end), pair(b_start, b_end)];
                if o.withmatchlen {
                    m.push(Value::Int(len));
                }
                matches.push(Value::Array(m));
            }
            a_start = alen;
        }
    }
    Ok(if o.idx {
        Value::Map(vec![
            (Value::bulk_str("matches"), Value::Array(matches)),
            (Value::bulk_str("len"), Value::Int(total as i64)),
        ])
    } else if o.len {
        Value::Int(total as i64)
    } else {
        Value::Bulk(Bytes::from(result))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::respond::Proto;

    fn run(a: &str, b: &str, opts: &[&str]) -> String {
        let args: Vec<Bytes> = opts
            .iter()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect();
        let o = options(&args).unwrap();
        let v = lcs(a.as_bytes(), b.as_bytes(), o).unwrap();
        String::from_utf8(v.to_bytes(Proto::Resp2).to_vec()).unwrap()
    }

    /// The examples of Redis's LCS documentation.
    #[test]
    fn matches_the_redis_documentation() {
        assert_eq!(run("ohmytext", "mynewtext", &[]), "$6\r\nmytext\r\n");
        assert_eq!(run("ohmytext", "mynewtext", &["LEN"]), ":6\r\n");
        assert_eq!(
            run("ohmytext", "mynewtext", &["IDX"]),
            "*4\r\n$7\r\nmatches\r\n*2\r\n*2\r\n*2\r\n:4\r\n:7\r\n*2\r\n:5\r\n:8\r\n*2\r\n*2\r\n:2\r\n:3\r\n*2\r\n:0\r\n:1\r\n$3\r\nlen\r\n:6\r\n"
        );
        assert_eq!(
            run("ohmytext", "mynewtext", &["IDX", "MINMATCHLEN", "4", "WITHMATCHLEN"]),
            "*4\r\n$7\r\nmatches\r\n*1\r\n*3\r\n*2\r\n:4\r\n:7\r\n*2\r\n:5\r\n:8\r\n:4\r\n$3\r\nlen\r\n:6\r\n"
        );
        assert!(options(&[Bytes::from("IDX"), Bytes::from("LEN")]).is_err());
        assert!(options(&[Bytes::from("NOPE")]).is_err());
    }
}

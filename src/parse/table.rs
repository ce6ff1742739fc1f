//! The command table: arity, flags and key positions from the backend's own `COMMAND`
//! reply (so it matches the server version and its modules), with tierproxy's routing
//! policy as an overlay ([`Policy`]). Keys are found with Redis 7 key specs, falling back
//! to the legacy first/last/step triple.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use redis_protocol::resp2::types::OwnedFrame as F;

/// How the proxy routes a command: the only hand-written part of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Forward to the owner of the keys' slot (or any master if it has no keys).
    Forward,
    /// Answered by the proxy itself.
    Local,
    /// Split by slot and merged: MGET (array in key order).
    Mget,
    /// Split by slot: MSET (all OK).
    Mset,
    /// Split by slot, integer replies summed: DEL, UNLINK, EXISTS, TOUCH.
    SumKeys,
    /// Sent to every master, replies combined: DBSIZE, KEYS, FLUSHALL, …
    Keyspace,
    /// Run on a dedicated upstream connection (may block the connection it runs on).
    Blocking,
    /// Needs connection state the shared pipelined connections cannot carry (yet).
    Unsupported,
    /// The (un)subscribe family: the session's subscriber connections (route::pubsub).
    Subscribe,
    /// PUBSUB CHANNELS/NUMSUB/…: aggregated over every master.
    PubSubInfo,
    /// SCRIPT LOAD/EXISTS/FLUSH, FUNCTION LOAD/DELETE/FLUSH/RESTORE: every master.
    AllMasters,
}

#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub write: bool,
    /// Scripts and functions: may write keys without the `write` flag.
    pub may_replicate: bool,
    pub readonly: bool,
    pub blocking: bool,
    pub movablekeys: bool,
    pub pubsub: bool,
    pub admin: bool,
}

#[derive(Debug, Clone)]
enum BeginSearch {
    Index(i64),
    Keyword { keyword: Vec<u8>, startfrom: i64 },
}

#[derive(Debug, Clone)]
enum FindKeys {
    Range {
        lastkey: i64,
        keystep: i64,
        limit: i64,
    },
    Keynum {
        keynumidx: i64,
        firstkey: i64,
        keystep: i64,
    },
}

#[derive(Debug, Clone)]
struct KeySpec {
    begin: BeginSearch,
    find: FindKeys,
    /// The key-spec flags say the keys may be changed (RW, OW, RM, insert, update,
    /// delete). EVAL and FCALL carry no `write` command flag, only this.
    writes: bool,
}

#[derive(Debug, Clone)]
pub struct CommandInfo {
    /// Lower-case full name, `get` or `config|get`: what Redis's errors quote.
    pub name: String,
    pub arity: i64,
    pub flags: Flags,
    first_key: i64,
    last_key: i64,
    step: i64,
    key_specs: Vec<KeySpec>,
    pub subcommands: HashMap<Vec<u8>, Arc<CommandInfo>>,
    pub policy: Policy,
    /// INFO commandstats and the duration histogram, shared by every table built.
    pub stat: &'static crate::metrics::CmdStat,
    /// Whether the request path's fast lane may take this command, and how: decided
    /// once per command by the router (`route::plan_forward`), which knows the proxy's
    /// own handling.
    pub lane: std::sync::OnceLock<Option<Lane>>,
}

/// How the fast lane takes a command it may take (see [`CommandInfo::lane`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lane {
    /// Forwarded, its reply may carry spill stubs (the spill store is on).
    pub values: bool,
    /// A read L1 caches: answered from L1 when it hits there (L1 is on).
    pub cached: bool,
    /// A write, L1 on: its keys are marked as being written from before it is sent
    /// until its reply is in (`L1::begin_write`).
    pub writes: bool,
}

impl CommandInfo {
    /// Whether running this command may change the keys it names (L1 invalidates them).
    pub fn may_write(&self) -> bool {
        self.flags.write || self.flags.may_replicate || self.key_specs.iter().any(|k| k.writes)
    }

    pub fn arity_ok(&self, argc: usize) -> bool {
        arity_fits(self.arity, argc)
    }

    /// Argument indices of the keys in `args` (args[0] is the command name).
    pub fn key_indices(&self, args: &[Bytes]) -> Vec<usize> {
        let mut keys = Vec::new();
        self.for_each_key(args, |i| keys.push(i));
        keys
    }

    /// Calls `f` with the argument index of every key in `args`, in order (no
    /// allocation: the request path's form of [`Self::key_indices`]).
    pub fn for_each_key(&self, args: &[Bytes], mut f: impl FnMut(usize)) {
        let argc = args.len() as i64;
        if self.key_specs.is_empty() {
            if self.first_key <= 0 {
                return;
            }
            let last = if self.last_key < 0 {
                argc + self.last_key
            } else {
                self.last_key
            };
            let step = self.step.max(1);
            let mut i = self.first_key;
            while i <= last && i < argc {
                f(i as usize);
                i += step;
            }
            return;
        }
        for spec in &self.key_specs {
            let first = match &spec.begin {
                BeginSearch::Index(i) => *i,
                BeginSearch::Keyword { keyword, startfrom } => {
                    let (start, end) = if *startfrom > 0 {
                        (*startfrom, argc - 1)
                    } else {
                        (argc + startfrom, 0)
                    };
                    let mut found = 0;
                    let mut i = start;
                    loop {
                        if i >= argc || i < 0 {
                            break;
                        }
                        if args[i as usize].eq_ignore_ascii_case(keyword) {
                            found = i + 1;
                            break;
                        }
                        if i == end {
                            break;
                        }
                        i = if start <= end { i + 1 } else { i - 1 };
                    }
                    if found == 0 {
                        continue;
                    }
                    found
                }
            };
            let (first, last, step) = match &spec.find {
                FindKeys::Range {
                    lastkey,
                    keystep,
                    limit,
                } => {
                    let last = if *lastkey >= 0 {
                        first + lastkey
                    } else if *limit == 0 {
                        argc + lastkey
                    } else {
                        first + ((argc - first) / limit + lastkey)
                    };
                    (first, last, *keystep)
                }
                FindKeys::Keynum {
                    keynumidx,
                    firstkey,
                    keystep,
                } => {
                    let idx = first + keynumidx;
                    if idx >= argc || idx < 0 {
                        continue;
                    }
                    let Some(n) = std::str::from_utf8(&args[idx as usize])
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                        .filter(|n| *n >= 0)
                    else {
                        // Let the server report the bad numkeys.
                        continue;
                    };
                    let first = first + firstkey;
                    // n comes from the client: never past the arguments (no overflow).
                    let n = n.min(argc);
                    (first, first + n - 1, *keystep)
                }
            };
            let step = step.max(1);
            let mut i = first;
            while i <= last {
                if i >= argc || i < first {
                    break;
                }
                f(i as usize);
                i += step;
            }
        }
    }
}

/// All commands the backend knows, by lower-case name.
#[derive(Debug, Default)]
pub struct CommandTable {
    commands: HashMap<Vec<u8>, Arc<CommandInfo>, ahash::RandomState>,
    /// The raw `COMMAND COUNT` for local answers.
    pub count: usize,
}

impl CommandTable {
    /// Builds the table from a RESP2 `COMMAND` reply.
    pub fn from_command_reply(reply: &[u8]) -> Result<CommandTable, String> {
        let (frame, _) = redis_protocol::resp2::decode::decode(reply)
            .map_err(|e| format!("COMMAND reply: {e:?}"))?
            .ok_or("COMMAND reply incomplete")?;
        let F::Array(entries) = frame else {
            return Err(format!("COMMAND reply is not an array: {frame:?}"));
        };
        let mut commands = HashMap::with_hasher(ahash::RandomState::new());
        for e in &entries {
            if let Some(info) = parse_entry(e) {
                commands.insert(info.name.as_bytes().to_vec(), Arc::new(info));
            }
        }
        if commands.is_empty() {
            return Err("COMMAND reply listed no commands".into());
        }
        let count = commands.len();
        Ok(CommandTable { commands, count })
    }

    /// Looks up the command (and, for containers like CONFIG, its subcommand).
    pub fn lookup(&self, args: &[Bytes]) -> Lookup {
        self.lookup_lowered(&Lowered::new(&args[0]), args)
    }

    /// [`Self::lookup_lowered`] for a known command, by reference (no count taken on the
    /// shared entry).
    pub fn lookup_found(&self, name: &Lowered, args: &[Bytes]) -> Option<&Arc<CommandInfo>> {
        let cmd = self.commands.get(name.as_bytes())?;
        if cmd.subcommands.is_empty() || args.len() < 2 {
            return Some(cmd);
        }
        cmd.subcommands.get(&lower(&args[1]))
    }

    /// As [`CommandTable::lookup`], with the command name already lower-cased.
    pub fn lookup_lowered(&self, name: &Lowered, args: &[Bytes]) -> Lookup {
        let Some(cmd) = self.commands.get(name.as_bytes()) else {
            return Lookup::Unknown;
        };
        if cmd.subcommands.is_empty() {
            return Lookup::Found(cmd.clone());
        }
        if args.len() < 2 {
            return Lookup::Found(cmd.clone());
        }
        match cmd.subcommands.get(&lower(&args[1])) {
            Some(sub) => Lookup::Found(sub.clone()),
            None => Lookup::UnknownSub(cmd.clone()),
        }
    }

    pub fn len(&self) -> usize {
        self.commands.len()
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }
}

pub enum Lookup {
    Found(Arc<CommandInfo>),
    UnknownSub(Arc<CommandInfo>),
    Unknown,
}

/// Redis's arity rule: `argc` arguments (the name included) fit `arity` exactly, or at
/// least `-arity` of them when it is negative.
pub fn arity_fits(arity: i64, argc: usize) -> bool {
    let argc = argc as i64;
    if arity >= 0 {
        argc == arity
    } else {
        argc >= -arity
    }
}

pub fn lower(b: &[u8]) -> Vec<u8> {
    b.to_ascii_lowercase()
}

/// A lower-cased command name without a heap allocation for the usual short names.
pub enum Lowered {
    Inline([u8; 32], usize),
    Heap(Vec<u8>),
}

impl Lowered {
    pub fn new(b: &[u8]) -> Lowered {
        if b.len() <= 32 {
            let mut buf = [0u8; 32];
            for (d, s) in buf.iter_mut().zip(b) {
                *d = s.to_ascii_lowercase();
            }
            Lowered::Inline(buf, b.len())
        } else {
            Lowered::Heap(lower(b))
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Lowered::Inline(buf, n) => &buf[..*n],
            Lowered::Heap(v) => v,
        }
    }
}

fn as_bytes(f: &F) -> Option<&[u8]> {
    match f {
        F::BulkString(b) | F::SimpleString(b) => Some(b),
        _ => None,
    }
}

fn as_int(f: &F) -> Option<i64> {
    match f {
        F::Integer(i) => Some(*i),
        _ => None,
    }
}

/// A RESP2 flattened map `[k1, v1, k2, v2]` as lookups.
fn field<'a>(items: &'a [F], key: &str) -> Option<&'a F> {
    items
        .chunks(2)
        .find(|kv| as_bytes(&kv[0]).is_some_and(|k| k.eq_ignore_ascii_case(key.as_bytes())))
        .and_then(|kv| kv.get(1))
}

fn parse_entry(e: &F) -> Option<CommandInfo> {
    let F::Array(items) = e else { return None };
    let name = String::from_utf8_lossy(as_bytes(items.first()?)?).to_ascii_lowercase();
    let arity = as_int(items.get(1)?)?;
    let mut flags = Flags::default();
    if let Some(F::Array(fl)) = items.get(2) {
        for f in fl.iter().filter_map(as_bytes) {
            match &f.to_ascii_lowercase()[..] {
                b"write" => flags.write = true,
                b"may_replicate" => flags.may_replicate = true,
                b"readonly" => flags.readonly = true,
                b"blocking" => flags.blocking = true,
                b"movablekeys" => flags.movablekeys = true,
                b"pubsub" => flags.pubsub = true,
                b"admin" => flags.admin = true,
                _ => {}
            }
        }
    }
    let first_key = items.get(3).and_then(as_int).unwrap_or(0);
    let last_key = items.get(4).and_then(as_int).unwrap_or(0);
    let step = items.get(5).and_then(as_int).unwrap_or(0);
    let key_specs = match items.get(8) {
        Some(F::Array(specs)) => specs.iter().filter_map(parse_key_spec).collect(),
        _ => Vec::new(),
    };
    let mut subcommands = HashMap::new();
    if let Some(F::Array(subs)) = items.get(9) {
        for s in subs {
            if let Some(sub) = parse_entry(s) {
                let short = sub
                    .name
                    .split_once('|')
                    .map(|(_, s)| s.to_string())
                    .unwrap_or_else(|| sub.name.clone());
                subcommands.insert(short.into_bytes(), Arc::new(sub));
            }
        }
    }
    let mut info = CommandInfo {
        lane: std::sync::OnceLock::new(),
        stat: crate::metrics::command_stat(&name),
        name,
        arity,
        flags,
        first_key,
        last_key,
        step,
        key_specs,
        subcommands,
        policy: Policy::Forward,
    };
    info.policy = policy_for(&info);
    Some(info)
}

fn parse_key_spec(f: &F) -> Option<KeySpec> {
    let F::Array(items) = f else { return None };
    let F::Array(bs) = field(items, "begin_search")? else {
        return None;
    };
    let F::Array(fk) = field(items, "find_keys")? else {
        return None;
    };
    let bs_type = as_bytes(field(bs, "type")?)?;
    let F::Array(bs_spec) = field(bs, "spec")? else {
        return None;
    };
    let begin = match bs_type {
        b"index" => BeginSearch::Index(as_int(field(bs_spec, "index")?)?),
        b"keyword" => BeginSearch::Keyword {
            keyword: as_bytes(field(bs_spec, "keyword")?)?.to_vec(),
            startfrom: as_int(field(bs_spec, "startfrom")?)?,
        },
        // "unknown": keys the server cannot locate either (e.g. SORT BY patterns).
        _ => return None,
    };
    let fk_type = as_bytes(field(fk, "type")?)?;
    let F::Array(fk_spec) = field(fk, "spec")? else {
        return None;
    };
    let find = match fk_type {
        b"range" => FindKeys::Range {
            lastkey: as_int(field(fk_spec, "lastkey")?)?,
            keystep: as_int(field(fk_spec, "keystep")?)?,
            limit: as_int(field(fk_spec, "limit")?)?,
        },
        b"keynum" => FindKeys::Keynum {
            keynumidx: as_int(field(fk_spec, "keynumidx")?)?,
            firstkey: as_int(field(fk_spec, "firstkey")?)?,
            keystep: as_int(field(fk_spec, "keystep")?)?,
        },
        _ => return None,
    };
    let writes = match field(items, "flags") {
        Some(F::Array(fl)) => fl.iter().filter_map(as_bytes).any(|f| {
            matches!(
                f.to_ascii_lowercase().as_slice(),
                b"rw" | b"ow" | b"rm" | b"insert" | b"update" | b"delete"
            )
        }),
        _ => false,
    };
    Some(KeySpec {
        begin,
        find,
        writes,
    })
}

/// tierproxy's overlay. Everything not named here is forwarded by its keys.
fn policy_for(info: &CommandInfo) -> Policy {
    match info.name.as_str() {
        // Answered by the proxy: connection state, emulated server and cluster views.
        // COMMAND and LOLWUT are not here: they are the backend's to answer.
        "ping" | "echo" | "quit" | "reset" | "hello" | "auth" | "select" | "time" | "info"
        | "readonly" | "readwrite" | "asking" => Policy::Local,
        n if n.starts_with("client|") || n.starts_with("cluster|") => Policy::Local,
        n if n.starts_with("config|") => Policy::Local,
        "mget" => Policy::Mget,
        "mset" => Policy::Mset,
        "del" | "unlink" | "exists" | "touch" => Policy::SumKeys,
        "dbsize" | "keys" | "scan" | "randomkey" | "flushall" | "flushdb" => Policy::Keyspace,
        // Connection-scoped state: transactions, subscriptions, replication streams.
        // Transactions are caught before routing (route::txn).
        "subscribe" | "unsubscribe" | "psubscribe" | "punsubscribe" | "ssubscribe"
        | "sunsubscribe" => Policy::Subscribe,
        n if n.starts_with("pubsub|") => Policy::PubSubInfo,
        // The proxy's own slow log: the time clients see, not one node's.
        n if n.starts_with("slowlog|") => Policy::Local,
        "wait" => Policy::Blocking,
        // Script and function state lives on each node (route::scripts).
        "script|load" | "script|exists" | "script|flush" | "function|load" | "function|delete"
        | "function|flush" | "function|restore" | "function|list" => Policy::AllMasters,
        "monitor" | "sync" | "psync" | "replconf" | "waitaof" | "shutdown" | "failover"
        | "replicaof" | "slaveof" | "debug" => Policy::Unsupported,
        n if n.starts_with("client") || n.starts_with("cluster") || n.starts_with("config") => {
            Policy::Local
        }
        _ if info.flags.blocking => Policy::Blocking,
        _ => Policy::Forward,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::parse::request::args;

    #[test]
    fn key_specs_keynum_and_range() {
        let eval = CommandInfo {
            name: "eval".into(),
            arity: -3,
            flags: Flags::default(),
            first_key: 0,
            last_key: 0,
            step: 0,
            key_specs: vec![KeySpec {
                begin: BeginSearch::Index(2),
                find: FindKeys::Keynum {
                    keynumidx: 0,
                    firstkey: 1,
                    keystep: 1,
                },
                writes: false,
            }],
            subcommands: HashMap::new(),
            policy: Policy::Forward,
            stat: crate::metrics::command_stat("eval"),
            lane: std::sync::OnceLock::new(),
        };
        assert_eq!(
            eval.key_indices(&args(&["eval", "s", "2", "a", "b", "x"])),
            vec![3, 4]
        );
        assert_eq!(
            eval.key_indices(&args(&["eval", "s", "0"])),
            Vec::<usize>::new()
        );
        let mset = CommandInfo {
            key_specs: vec![KeySpec {
                begin: BeginSearch::Index(1),
                find: FindKeys::Range {
                    lastkey: -1,
                    keystep: 2,
                    limit: 0,
                },
                writes: false,
            }],
            ..eval.clone()
        };
        assert_eq!(
            mset.key_indices(&args(&["mset", "a", "1", "b", "2"])),
            vec![1, 3]
        );
        let xread = CommandInfo {
            key_specs: vec![KeySpec {
                begin: BeginSearch::Keyword {
                    keyword: b"STREAMS".to_vec(),
                    startfrom: 1,
                },
                find: FindKeys::Range {
                    lastkey: -1,
                    keystep: 1,
                    limit: 2,
                },
                writes: false,
            }],
            ..eval
        };
        assert_eq!(
            xread.key_indices(&args(&[
                "xread", "count", "1", "streams", "a", "b", "0", "0"
            ])),
            vec![4, 5]
        );
    }
}

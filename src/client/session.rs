//! Per-connection state, and the registry of connections that CLIENT LIST reads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::respond::Proto;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    On,
    Off,
    /// Skip the reply of the next command only.
    Skip,
}

/// What other connections may read about this one (CLIENT LIST).
#[derive(Debug, Clone, Default)]
pub struct Meta {
    pub name: String,
    pub lib_name: String,
    pub lib_ver: String,
    pub user: String,
    pub resp: i64,
    pub last_cmd: String,
}

pub struct ClientEntry {
    pub id: u64,
    pub addr: SocketAddr,
    pub laddr: SocketAddr,
    pub created: Instant,
    pub last_active_ms: AtomicU64,
    pub meta: Mutex<Meta>,
}

impl ClientEntry {
    /// One line of CLIENT LIST / CLIENT INFO, in Redis's format (fields it cannot know,
    /// such as buffer sizes of the upstream connection, are reported as 0).
    pub fn describe(&self, epoch: Instant) -> String {
        let m = self.meta.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let now_ms = epoch.elapsed().as_millis() as u64;
        let idle = now_ms.saturating_sub(self.last_active_ms.load(Ordering::Relaxed)) / 1000;
        format!(
            "id={} addr={} laddr={} fd=-1 name={} age={} idle={} flags=N db=0 sub=0 psub=0 ssub=0 multi=-1 qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r cmd={} user={} redir=-1 resp={} lib-name={} lib-ver={}",
            self.id,
            self.addr,
            self.laddr,
            m.name,
            self.created.elapsed().as_secs(),
            idle,
            if m.last_cmd.is_empty() { "NULL" } else { &m.last_cmd },
            m.user,
            m.resp,
            m.lib_name,
            m.lib_ver,
        )
    }
}

#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    clients: Mutex<HashMap<u64, Arc<ClientEntry>>>,
}

impl Registry {
    pub fn register(
        &self,
        addr: SocketAddr,
        laddr: SocketAddr,
        epoch: Instant,
    ) -> Arc<ClientEntry> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let e = Arc::new(ClientEntry {
            id,
            addr,
            laddr,
            created: Instant::now(),
            last_active_ms: AtomicU64::new(epoch.elapsed().as_millis() as u64),
            meta: Mutex::new(Meta {
                user: "default".into(),
                resp: 2,
                ..Meta::default()
            }),
        });
        self.lock().insert(id, e.clone());
        e
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn all(&self) -> Vec<Arc<ClientEntry>> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by_key(|e| e.id);
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ClientEntry>>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The state a command may read or change.
pub struct Session {
    pub entry: Arc<ClientEntry>,
    pub proto: Proto,
    pub authenticated: bool,
    pub user: String,
    /// The user is read-only: write commands get NOPERM.
    pub readonly: bool,
    pub name: Option<String>,
    pub reply_mode: ReplyMode,
    /// Set by QUIT: reply, then close.
    pub closing: bool,
    /// The last command run, as last published to CLIENT LIST.
    pub last_cmd: Option<Arc<crate::parse::table::CommandInfo>>,
    /// MULTI/WATCH state.
    pub txn: crate::route::txn::TxnState,
    /// Subscriptions, once the client subscribed to anything.
    pub pubsub: Option<Box<crate::route::pubsub::PubSub>>,
    /// Set by dispatch for the command just dispatched: its counters (None for unknown
    /// commands) and where its reply comes from.
    pub cmd_stat: Option<&'static crate::metrics::CmdStat>,
    pub level: crate::metrics::Level,
    /// The key namespace of the user (see [`crate::route::namespace`]); None: none.
    pub namespace: Option<bytes::Bytes>,
    /// The fast lane looked the next command up in L1 and missed (counted); `true`: its
    /// key was admitted, to be read and filled; `false`: to be read as it is. The
    /// ordinary path neither looks nor counts again. Cleared once that command is
    /// dispatched.
    pub l1_missed: Option<bool>,
}

/// A configured namespace as the session holds it: `""` is none.
pub fn namespace(ns: &str) -> Option<bytes::Bytes> {
    (!ns.is_empty()).then(|| bytes::Bytes::copy_from_slice(ns.as_bytes()))
}

impl Session {
    pub fn new(entry: Arc<ClientEntry>, auth_required: bool) -> Session {
        Session {
            entry,
            proto: Proto::Resp2,
            authenticated: !auth_required,
            user: "default".into(),
            readonly: false,
            name: None,
            reply_mode: ReplyMode::On,
            closing: false,
            last_cmd: None,
            txn: Default::default(),
            pubsub: None,
            cmd_stat: None,
            level: crate::metrics::Level::L2,
            namespace: None,
            l1_missed: None,
        }
    }

    /// The connection is now `p` (AUTH, HELLO AUTH, RESET): its rights and namespace;
    /// `default_ns` is the configured `namespace`. Refused while subscribed if the key
    /// namespace would change: the subscriptions' channel names live in the old one.
    pub fn become_user(
        &mut self,
        p: super::auth::Principal,
        default_ns: &str,
    ) -> Result<(), crate::error::Error> {
        let ns = namespace(p.namespace.as_deref().unwrap_or(default_ns));
        if ns != self.namespace && self.subscribed() {
            return Err(crate::error::Error::proxy(
                "cannot switch to a user of another key namespace while subscribed: unsubscribe first",
            ));
        }
        self.namespace = ns;
        self.readonly = p.readonly;
        self.user = p.name.clone();
        self.update_meta(|m| m.user = p.name);
        Ok(())
    }

    pub fn id(&self) -> u64 {
        self.entry.id
    }

    /// Pool index hint: one client always uses the same connection to a given node.
    pub fn hint(&self) -> usize {
        self.entry.id as usize
    }

    /// In subscribed mode: subscribed to at least one channel, pattern or shard channel.
    pub fn subscribed(&self) -> bool {
        self.pubsub.as_ref().is_some_and(|p| p.active())
    }

    pub fn update_meta(&self, f: impl FnOnce(&mut Meta)) {
        let mut m = self.entry.meta.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut m);
    }
}

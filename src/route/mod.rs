//! The request path: one command in, one [`Pending`] reply out.
//!
//! Order of checks is Redis's own (`processCommand`): unknown command, arity,
//! authentication, then routing. Routing is by the command table's [`Policy`]:
//! answered locally, forwarded to the owner of the keys' slot, split and merged across
//! slots, fanned out to every master, or run on a dedicated connection.

mod blocking;
pub mod cache;
mod keyspace;
mod lcs;
mod local;
mod multi;
pub mod namespace;
pub mod pubsub;
pub mod scripts;
mod spill;
mod tags;
pub mod txn;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::client::session::Session;
use crate::error::Error;
use crate::parse::request::Request;
use crate::parse::table::{arity_fits, Lane, Lookup, Lowered, Policy};
use crate::respond::Value;
use crate::upstream::{key_slot, GroupTicket, Mode, Target, Ticket};
use crate::Proxy;

pub type BoxFuture = Pin<Box<dyn Future<Output = Value> + Send>>;

/// A reply that may not be known yet. Forwarded requests are already queued upstream
/// when a `Pending` exists; resolving it only waits.
pub enum Pending {
    Ready(Value),
    Forwarded(Ticket),
    /// A forwarded read whose reply may carry spill stubs (GET, MGET, …): resolved like
    /// `Forwarded`, then any stub is replaced by its value. No box for the common case.
    Values(Ticket),
    Later(BoxFuture),
    /// A command that may wait indefinitely on its own upstream connection; abandoned
    /// (and that connection closed) if the client goes away meanwhile. Deferred too.
    Blocking(BoxFuture),
    /// A reply whose request reaches the upstream only when it is awaited: later
    /// commands of the pipeline must wait for it, or they would overtake it.
    Deferred(BoxFuture),
    /// The first command of a group forwarded together ([`plan_forward`]): the replies
    /// of the whole group arrive with it. Resolved by the client loop, which hands the
    /// later replies to the group's [`Pending::Member`]s.
    Group(GroupTicket, Member),
    /// A later command of a group.
    Member(Member),
}

/// A command of a forwarded group: what its reply needs.
pub struct Member {
    /// Where it went and what it was, for a redirect.
    pub target: Target,
    pub data: Bytes,
    /// The reply may hold a spill stub (GET and the like, spill store on).
    pub values: bool,
    /// Its group's index within its run (one group per node).
    pub group: usize,
}

impl Member {
    /// This member's reply, given its share of the group's replies.
    pub async fn reply(
        self,
        px: &Proxy,
        proto: crate::respond::Proto,
        hint: usize,
        addr: Arc<str>,
        got: Option<Result<Bytes, Value>>,
    ) -> Value {
        let raw = match got {
            Some(Ok(raw)) => raw,
            Some(Err(v)) => return v,
            None => return Error::proxy("a grouped reply went missing").to_reply(),
        };
        let raw = if crate::upstream::needs_follow_up(&raw) {
            let followed = px
                .upstream
                .follow(self.target, self.data, proto, hint, addr, raw);
            match Box::pin(followed).await {
                Ok(raw) => raw,
                Err(e) => return e.to_reply(),
            }
        } else {
            raw
        };
        if self.values {
            return spill::resolved(px, raw).await;
        }
        Value::Raw(raw)
    }
}

/// Whether a reply may carry a spill stub to be replaced by its value.
pub fn reply_may_hold_stub(raw: &Bytes) -> bool {
    spill::may_hold_stub(raw)
}

/// What the fast lane ([`plan_forward`]) found a command to be.
pub struct Plan<'t> {
    pub info: &'t Arc<crate::parse::table::CommandInfo>,
    pub target: Target,
    pub values: bool,
    /// A read to answer from L1 if it holds the reply ([`cache::lane_read`]); a miss
    /// is forwarded (to its key's slot, not `target`) or takes the ordinary path.
    pub cached: bool,
    /// A write with L1 on: its keys must be marked written until its reply is in
    /// ([`crate::l1::L1::begin_write`]).
    pub writes: bool,
}

/// The fast lane for the commonest requests: a command that [`dispatch`] would only
/// forward as it is (no spill write, no namespace, no transaction, no subscription, no
/// script bookkeeping; with L1 on, a write marks its keys), or a read that L1 answers,
/// is planned here
/// instead, so the client loop can send a run of them to one node as one group, with
/// one reply hand-over for all, and write L1's answers without a future per command.
/// `None`: the command takes the ordinary path.
pub fn plan_forward<'t>(
    px: &Proxy,
    sess: &Session,
    table: &'t crate::parse::table::CommandTable,
    req: &Request,
) -> Option<Plan<'t>> {
    if !sess.authenticated
        || sess.readonly
        || sess.namespace.is_some()
        || sess.reply_mode != crate::client::session::ReplyMode::On
        || sess.txn.in_multi()
        || sess.subscribed()
    {
        return None;
    }
    let lowered = Lowered::new(&req.args[0]);
    let info = table.lookup_found(&lowered, &req.args)?;
    if !info.arity_ok(req.args.len()) {
        return None;
    }
    let lane = (*info.lane.get_or_init(|| lane_of(px, info)))?;
    // Between WATCH and EXEC reads go to Redis (see `with_l1`): forwarded as they are.
    if lane.cached && !sess.txn.is_watching() {
        return Some(Plan {
            info,
            target: Target::Any,
            values: lane.values,
            cached: true,
            writes: false,
        });
    }
    // CROSSSLOT is the ordinary path's to report.
    let target = target_of(px, info, &req.args).ok()?;
    Some(Plan {
        info,
        target,
        values: lane.values,
        cached: false,
        writes: lane.writes,
    })
}

/// Whether `dispatch` would only forward `info` as it is (given an arity that fits), or
/// with L1 on, answer it from L1 on a hit or mark the keys it writes: how the lane
/// takes it, or `None` for the commands it handles before routing by policy
/// (transactions, the proxy's own commands, the spill store's), with their own
/// bookkeeping (scripts, PUBLISH), or that flush L1. Fixed per command and process, so
/// decided once.
fn lane_of(px: &Proxy, info: &crate::parse::table::CommandInfo) -> Option<Lane> {
    let name = info.name.as_str();
    let spill = px.spill.is_some();
    // Arity fixes what the spill store's checks look at (SET's value is there, SETEX
    // has four arguments, MSET at least one pair): the smallest fitting count stands
    // for all.
    let argc = info.arity.unsigned_abs() as usize;
    let own = matches!(
        name,
        "eval" | "eval_ro" | "evalsha" | "evalsha_ro" | "publish"
    ) || matches!(name, "multi" | "exec" | "discard" | "watch" | "unwatch")
        || local::local_arity(name).is_some()
        || (spill && spill::intercepts(name, argc))
        || matches!(name, "flushall" | "flushdb");
    // With L1 on, a cacheable read (MGET's policy is its own, so it is not here).
    let cached = px.l1.is_some() && cache::cacheable(name);
    (info.policy == Policy::Forward && !own).then_some(Lane {
        values: spill && spill::returns_values(name),
        cached,
        writes: px.l1.is_some() && info.may_write(),
    })
}

impl Pending {
    pub fn error(e: Error) -> Pending {
        Pending::Ready(e.to_reply())
    }

    pub async fn resolve(self, px: &Proxy) -> Value {
        match self {
            Pending::Ready(v) => v,
            Pending::Forwarded(t) => match px.upstream.finish(t).await {
                Ok(raw) => Value::Raw(raw),
                Err(e) => e.to_reply(),
            },
            Pending::Values(t) => match px.upstream.finish(t).await {
                Ok(raw) => spill::resolved(px, raw).await,
                Err(e) => e.to_reply(),
            },
            Pending::Later(f) | Pending::Blocking(f) | Pending::Deferred(f) => f.await,
            // The client loop resolves groups itself.
            Pending::Group(..) | Pending::Member(_) => {
                Error::proxy("a grouped reply was resolved on its own").to_reply()
            }
        }
    }

    pub fn is_blocking(&self) -> bool {
        matches!(self, Pending::Blocking(_))
    }

    /// Whether later commands of the pipeline must wait until this one is resolved.
    pub fn is_deferred(&self) -> bool {
        matches!(self, Pending::Blocking(_) | Pending::Deferred(_))
    }

    /// Post-processes this reply, keeping its kind (blocking, deferred).
    pub fn then<F, Fut>(self, f: F) -> Pending
    where
        F: FnOnce(Pending) -> Fut,
        Fut: Future<Output = Value> + Send + 'static,
    {
        let kind = (self.is_blocking(), self.is_deferred());
        let fut = Box::pin(f(self));
        match kind {
            (true, _) => Pending::Blocking(fut),
            (_, true) => Pending::Deferred(fut),
            _ => Pending::Later(fut),
        }
    }
}

/// Commands a client may run before authenticating (Redis's `no-auth` flag).
fn allowed_before_auth(name: &[u8]) -> bool {
    matches!(
        &name.to_ascii_lowercase()[..],
        b"auth" | b"hello" | b"quit" | b"reset"
    )
}

pub async fn dispatch(px: &Arc<Proxy>, sess: &mut Session, req: Request) -> Pending {
    match &sess.namespace {
        // Boxed: namespaced or not is fixed per user, and the common future stays small.
        Some(ns) if sess.authenticated => {
            let ns = ns.clone();
            Box::pin(dispatch_namespaced(px, sess, ns, req)).await
        }
        _ => dispatch_plain(px, sess, req).await,
    }
}

/// A request of a namespaced user: keys (and KEYS/SCAN patterns) prefixed before it is
/// routed, key names stripped from the reply.
async fn dispatch_namespaced(
    px: &Arc<Proxy>,
    sess: &mut Session,
    ns: Bytes,
    req: Request,
) -> Pending {
    let lowered = Lowered::new(&req.args[0]);
    let table = px.upstream.table();
    let (req, strip) = match table
        .as_ref()
        .map(|t| t.lookup_lowered(&lowered, &req.args))
    {
        Some(Lookup::Found(info)) if info.arity_ok(req.args.len()) => {
            match namespace::rewrite(&ns, &info, namespace::event_channel(px), req) {
                Ok(r) => r,
                Err(e) => return Pending::error(e),
            }
        }
        _ => (
            namespace::rewrite_local(&ns, lowered.as_bytes(), req),
            namespace::Strip::Nothing,
        ),
    };
    let queued = sess.txn.queued();
    let p = dispatch_plain(px, sess, req).await;
    if strip != namespace::Strip::Nothing && sess.txn.queued() > queued {
        // Queued in MULTI: its reply comes back inside EXEC's.
        sess.txn.strip_last(ns.clone(), strip);
    }
    namespace::strip_reply(px, sess.proto, ns, strip, p)
}

async fn dispatch_plain(px: &Arc<Proxy>, sess: &mut Session, req: Request) -> Pending {
    use crate::metrics::Level;
    let lowered = Lowered::new(&req.args[0]);
    let name = lowered.as_bytes();
    px.stats
        .commands
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // One table lookup per command: for its counters now, for routing below.
    let table = px.upstream.table();
    let lookup = table
        .as_ref()
        .map(|t| t.lookup_lowered(&lowered, &req.args));
    sess.cmd_stat = match &lookup {
        Some(Lookup::Found(info)) => Some(info.stat),
        _ => None,
    };
    sess.level = Level::L2;

    if sess.readonly {
        if let Some(refused) = readonly_refuses(name, &lookup, &req.args) {
            crate::metrics::NOPERM_REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Inside MULTI the refusal aborts the transaction, as Redis's ACL check does.
            sess.txn.refuse_queued();
            return Pending::error(Error::noperm(&refused));
        }
    }
    if let Some(ps) = sess.pubsub.as_mut() {
        ps.settle();
    }
    // RESP2 subscribed mode allows only a few commands (after Redis's own checks).
    if sess.proto == crate::respond::Proto::Resp2 && sess.subscribed() {
        if name == b"ping" && req.args.len() <= 2 {
            return pubsub::subscribed_ping(&req);
        }
        if !pubsub::allowed_in_resp2_subscribed(name) {
            if let Some(Lookup::Found(info)) = &lookup {
                if info.arity_ok(req.args.len()) {
                    return Pending::error(Error::redis(format!(
                        "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
                        info.name
                    )));
                }
            }
        }
    }
    // The pinned connections (WATCH) and subscriber connections speak the protocol of
    // the moment they were opened: no switching under them.
    if name == b"hello" && (sess.txn.is_watching() || sess.subscribed()) {
        let wanted = req.args.get(1).map(|v| &v[..]);
        let current: &[u8] = match sess.proto {
            crate::respond::Proto::Resp2 => b"2",
            crate::respond::Proto::Resp3 => b"3",
        };
        if wanted.is_some_and(|v| v != current) {
            return Pending::error(Error::proxy(
                "HELLO cannot change the protocol while keys are WATCHed or channels subscribed (UNWATCH / UNSUBSCRIBE first)",
            ));
        }
    }
    // Transactions next: inside MULTI even PING is queued.
    let req = if txn::wants(sess, name) {
        // Boxed: the transaction path is rare, and keeps the common future small.
        match Box::pin(txn::intercept(px, sess, &lowered, req)).await {
            Ok(p) => {
                if name != b"exec" && name != b"watch" {
                    sess.level = Level::Local;
                }
                return p;
            }
            Err(req) => req,
        }
    } else {
        req
    };
    // Connection-level commands work even before the upstream is known.
    if let Some(p) = local::handle_early(px, sess, name, &req) {
        sess.level = Level::Local;
        return p;
    }
    let Some(lookup) = lookup else {
        // Without the table we cannot check existence or arity first; an unauthenticated
        // client learns nothing about the upstream either way.
        if !sess.authenticated {
            return Pending::error(Error::noauth());
        }
        return Pending::error(Error::NoTopology(px.upstream.last_error()));
    };
    let info = match lookup {
        Lookup::Found(info) => info,
        Lookup::UnknownSub(container) => {
            return Pending::error(Error::unknown_subcommand(&req.args[1], &container.name));
        }
        Lookup::Unknown => {
            return Pending::error(Error::unknown_command(&req.args[0], &req.args[1..]));
        }
    };
    if !info.arity_ok(req.args.len()) {
        return Pending::error(Error::arity(&info.name));
    }
    if !sess.authenticated && !allowed_before_auth(name) {
        return Pending::error(Error::noauth());
    }
    // CLIENT LIST's cmd= field: the shared record is touched only when it changes.
    if !sess
        .last_cmd
        .as_ref()
        .is_some_and(|c| Arc::ptr_eq(c, &info))
    {
        sess.update_meta(|m| m.last_cmd = info.name.clone());
        sess.last_cmd = Some(info.clone());
    }

    let Some(spill) = px.spill.as_ref() else {
        return with_l1(px, sess, &info, req).await;
    };
    let name = info.name.as_str();
    if matches!(
        name,
        "strlen" | "getrange" | "substr" | "append" | "setrange"
    ) {
        let guard = match (&px.l1, info.may_write()) {
            (Some(l1), true) => Some((l1.clone(), l1.begin_write(vec![req.args[1].clone()]))),
            _ => None,
        };
        let p = Box::pin(spill::string_op(px, sess.proto, sess.hint(), name, req)).await;
        return match guard {
            Some((l1, guard)) => cache::after_write(px, &l1, guard, false, p),
            None => p,
        };
    }
    if name == "lcs" {
        // Routed like any two-key command: CROSSSLOT first, as Redis Cluster would.
        if let Err(e) = target_of(px, &info, &req.args) {
            return Pending::error(e);
        }
        return Box::pin(spill::lcs(px, sess.proto, sess.hint(), req)).await;
    }
    if spill::has_value_positions(name, req.args.len()) {
        if !spill::must_wrap_any(spill, name, &req.args) {
            // Nothing to store: an ordinary write, whose reply (SET … GET, GETSET) may
            // still carry a stub.
            let p = with_l1(px, sess, &info, req).await;
            return spill::resolving(px, sess.proto, p);
        }
        // Boxed: storing values is a large future, and the rarer path.
        return Box::pin(spill_write(px, sess, &info, spill, req)).await;
    }
    let (p, resolved) = with_l1_resolving(px, sess, &info, req).await;
    if spill::returns_values(name) && !resolved {
        return spill::resolving(px, sess.proto, p);
    }
    p
}

/// A write with values to store in the spill store first.
async fn spill_write(
    px: &Arc<Proxy>,
    sess: &mut Session,
    info: &Arc<crate::parse::table::CommandInfo>,
    spill: &crate::spill::Spill,
    req: Request,
) -> Pending {
    let name = info.name.clone();
    let original_args = req.args.to_vec();
    let (req, objects) = match spill::prepare_write(spill, &name, req).await {
        Ok(r) => r,
        Err(e) => return Pending::error(e),
    };
    let proto = sess.proto;
    let p = with_l1(px, sess, info, req).await;
    spill::finish_write(px, name, original_args, objects, proto, p)
}

/// For a read-only user: the name to quote in NOPERM if this command may change data
/// or state. Checked after arity, as Redis does (a wrong arity still gets the arity
/// error). Refused:
/// - Redis's `write` flag, and commands that may write without it: EVAL, EVALSHA and
///   FCALL (`may_replicate` or read-write key specs, no `readonly` flag). Their `_RO`
///   forms, PFCOUNT (`readonly` with a read-write key spec) and PUBLISH stay allowed.
/// - administration forwarded to Redis (ACL, MODULE, …), which would run with the proxy's
///   own upstream credentials, and the proxy's resets (CONFIG RESETSTAT, SLOWLOG RESET);
///   the proxy's local read-only admin commands (CONFIG GET, CLIENT LIST) stay allowed.
/// - the proxy's TIERPROXY.TAG, TIERPROXY.INVALIDATE and TIERPROXY.L1 FLUSH.
fn readonly_refuses(name: &[u8], lookup: &Option<Lookup>, args: &[Bytes]) -> Option<String> {
    let argc = args.len();
    match lookup {
        Some(Lookup::Found(info)) if info.arity_ok(argc) => {
            let f = &info.flags;
            let writes = f.write || (!f.readonly && !f.pubsub && info.may_write());
            let admin = f.admin
                && (info.policy != Policy::Local
                    || matches!(info.name.as_str(), "config|resetstat" | "slowlog|reset"));
            (writes || admin).then(|| info.name.clone())
        }
        Some(Lookup::Found(_)) => None,
        _ => {
            let full = match name {
                b"tierproxy.tag" | b"tierproxy.invalidate" => {
                    String::from_utf8_lossy(name).into_owned()
                }
                b"tierproxy.l1"
                    if args
                        .get(1)
                        .is_some_and(|a| a.eq_ignore_ascii_case(b"flush")) =>
                {
                    "tierproxy.l1|flush".to_string()
                }
                _ => return None,
            };
            arity_fits(local::local_arity(&full)?, argc).then_some(full)
        }
    }
}

/// The L1 layer, then policy routing; whether the L1 read path already resolved spill
/// stubs (it must, before it caches a reply).
async fn with_l1_resolving(
    px: &Arc<Proxy>,
    sess: &mut Session,
    info: &Arc<crate::parse::table::CommandInfo>,
    req: Request,
) -> (Pending, bool) {
    // As `with_l1` decides (WATCHing reads go to Redis, and their stubs are resolved
    // by the caller like any forwarded read's).
    let via_cache = px.l1.is_some()
        && !info.may_write()
        && cache::cacheable(&info.name)
        && info.policy != Policy::Local
        && !sess.txn.is_watching();
    (with_l1(px, sess, info, req).await, via_cache)
}

async fn with_l1(
    px: &Arc<Proxy>,
    sess: &mut Session,
    info: &Arc<crate::parse::table::CommandInfo>,
    req: Request,
) -> Pending {
    if let Some(l1) = px.l1.clone() {
        if info.may_write() {
            let keys: Vec<Bytes> = info
                .key_indices(&req.args)
                .into_iter()
                .map(|i| req.args[i].clone())
                .collect();
            let flush = matches!(info.name.as_str(), "flushall" | "flushdb");
            // From before sending until the acknowledgement: no read serves, joins or
            // fills the old value (and the keys are invalidated again at the end).
            let guard = l1.begin_write(keys);
            if flush {
                l1.flush("FLUSHALL/FLUSHDB through the proxy");
            }
            let p = by_policy(px, sess, info, req).await;
            return cache::after_write(px, &l1, guard, flush, p);
        }
        // Between WATCH and EXEC a read must see Redis, not a cached reply whose
        // invalidation may still be on its way: optimistic locking depends on it.
        if cache::cacheable(&info.name) && info.policy != Policy::Local && !sess.txn.is_watching() {
            let keys = info.key_indices(&req.args);
            if info.name == "mget" && keys.len() > 1 {
                let keys = keys.iter().map(|&i| req.args[i].clone()).collect();
                return cache::mget(px, sess, &l1, keys).await;
            }
            if let [k] = keys[..] {
                let key = req.args[k].clone();
                return cache::read(px, sess, &l1, key, req).await;
            }
        }
    }
    by_policy(px, sess, info, req).await
}

/// Routes by the command's policy (see [`Policy`]).
async fn by_policy(
    px: &Arc<Proxy>,
    sess: &mut Session,
    info: &Arc<crate::parse::table::CommandInfo>,
    req: Request,
) -> Pending {
    match info.policy {
        Policy::Local => {
            sess.level = crate::metrics::Level::Local;
            local::handle(px, sess, &info.name, req).await
        }
        Policy::Mget | Policy::Mset | Policy::SumKeys => {
            multi::dispatch(px, sess, info.policy, info, req).await
        }
        Policy::Keyspace => keyspace::dispatch(px, sess, &info.name, req).await,
        Policy::Subscribe => pubsub::dispatch(px, sess, &info.name, req),
        Policy::PubSubInfo => pubsub::info(px, sess, &info.name, req),
        Policy::AllMasters => scripts::fan_out(px, sess, &info.name, req),
        Policy::Unsupported => Pending::error(Error::proxy(format!(
            "'{}' is not supported through the proxy yet (needs a pinned connection)",
            info.name
        ))),
        Policy::Blocking => {
            let target = match target_of(px, info, &req.args) {
                Ok(t) => t,
                Err(e) => return Pending::error(e),
            };
            if info.name == "wait" {
                return blocking::wait(px, sess.proto, req);
            }
            blocking::run(px, sess.proto, target, &info.name, req)
        }
        Policy::Forward => {
            let target = match target_of(px, info, &req.args) {
                Ok(t) => t,
                Err(e) => return Pending::error(e),
            };
            let target = if info.name == "publish" {
                pubsub::publish_target(&req.args)
            } else {
                target
            };
            match info.name.as_str() {
                "eval" | "eval_ro" => scripts::saw_eval(px, &req),
                "evalsha" | "evalsha_ro" => return scripts::evalsha(px, sess, target, req).await,
                _ => {}
            }
            Pending::Forwarded(
                px.upstream
                    .start(target, req.raw, sess.proto, sess.hint())
                    .await,
            )
        }
    }
}

/// Where command `info` with `args` goes: the slot all its keys share (found without
/// allocating), any master for none, `CROSSSLOT` (cluster mode only) if they don't share
/// one.
fn target_of(
    px: &Proxy,
    info: &crate::parse::table::CommandInfo,
    args: &[Bytes],
) -> Result<Target, Error> {
    let cluster = px.upstream.mode() == Some(Mode::Cluster);
    let mut slot: Option<u16> = None;
    let mut cross = false;
    info.for_each_key(args, |i| {
        if !cluster {
            // One node holds every slot: no hashing.
            slot = Some(0);
            return;
        }
        let s = key_slot(&args[i]);
        match slot {
            None => slot = Some(s),
            Some(first) if first != s => cross = true,
            Some(_) => {}
        }
    });
    match slot {
        _ if cross => Err(Error::crossslot()),
        Some(s) => Ok(Target::Slot(s)),
        None => Ok(Target::Any),
    }
}

//! A scheduling round: one snapshot, many placement requests.
//!
//! Each policy that answers in the round (a plugin, the built-in component, the native
//! fallback) gets its own session: an instance that received the snapshot once and
//! keeps its own view of free resources. The round keeps a log of every accepted
//! placement; before a session answers, it is told (`commit`) about the placements
//! other policies made since it last ran, so every answer sees every earlier one. A
//! session whose call failed is dropped (a trapped instance cannot be re-entered, and a
//! discarded answer may already be in its view); a new one, with a new session id,
//! starts from the snapshot and replays the whole log, its predecessor's entries
//! included.

use std::sync::Arc;

use shoal_policy_logic::{
    describe_unplaced, Cluster, Filter, Placement, PlacementRequest, Rejection, Snapshot,
};
use wasmtime::Store;

use crate::bindings::scheduler::shoal::policy::scheduling as ws;
use crate::bindings::scheduler::Scheduler;
use crate::convert;
use crate::host::{Binding, PolicyHost};
use crate::runtime::{CallError, Loaded, Pre, Runtime, State};
use crate::types::{DecidedBy, PlacementOutcome, PolicyKind, Unplaced};

/// Which guest a session runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placer {
    /// A plugin binding, by address (the session holds the `Arc`, so it stays unique).
    Plugin(usize),
    /// The built-in component.
    Builtin,
}

struct Entry {
    /// The session that made it (which therefore already has it in its view).
    by: SessionId,
    /// The request in its WIT form (it was converted to ask a guest anyway; sessions
    /// replay it as is, the native fallback converts it back).
    request: ws::PlacementRequest,
    nodes: Vec<u32>,
}

/// Identifies one session (one guest instance, or the native fallback) in a round. A
/// placer whose session failed gets a new session with a new id, which must replay
/// every entry, its predecessor's included.
type SessionId = u64;

/// The native fallback's session id.
const NATIVE: SessionId = u64::MAX;

struct Session {
    id: SessionId,
    by: Placer,
    store: Store<State>,
    instance: Scheduler,
    /// Log entries before this one are in the session's view.
    cursor: usize,
    /// Keeps the plugin version alive while the session uses it, even if it is
    /// replaced or removed meanwhile.
    _binding: Option<Arc<Binding>>,
}

/// A scheduling round in progress; see [`PolicyHost::begin_round`].
pub struct ScheduleRound<'h> {
    host: &'h PolicyHost,
    snapshot: &'h Snapshot,
    wit_snapshot: Option<ws::Snapshot>,
    sessions: Vec<Session>,
    native: Option<(Cluster, usize)>,
    log: Vec<Entry>,
    next_session: SessionId,
}

impl<'h> ScheduleRound<'h> {
    pub(crate) fn new(host: &'h PolicyHost, snapshot: &'h Snapshot) -> ScheduleRound<'h> {
        ScheduleRound {
            host,
            snapshot,
            wit_snapshot: None,
            sessions: Vec::new(),
            native: None,
            log: Vec::new(),
            next_session: 0,
        }
    }

    /// Places one request, after (and seeing) every earlier request of the round. Never
    /// fails: a plugin that misbehaves is replaced by the built-in policy for this call.
    pub fn place(&mut self, request: &PlacementRequest) -> PlacementOutcome {
        let wit_request = convert::request(request);
        let mut fallback_reason = None;
        if let Some(binding) = self.host.binding(PolicyKind::Scheduler, &request.service) {
            let by = Placer::Plugin(Arc::as_ptr(&binding) as usize);
            match self.try_session(by, Some(&binding), request, &wit_request) {
                Ok((p, session)) => {
                    self.host.succeeded(&binding);
                    return self.accept(
                        session,
                        request,
                        wit_request,
                        p,
                        binding.decided_by(),
                        None,
                    );
                }
                Err(e) => {
                    self.host.failed(&binding, &e);
                    fallback_reason = Some(format!("plugin {} {e}", binding.loaded.name));
                }
            }
        }
        match self.try_session(Placer::Builtin, None, request, &wit_request) {
            Ok((p, session)) => {
                return self.accept(
                    session,
                    request,
                    wit_request,
                    p,
                    DecidedBy::Builtin,
                    fallback_reason,
                )
            }
            Err(CallError::Guest(e)) => {
                return self.refuse(request, &e, DecidedBy::Builtin, fallback_reason)
            }
            Err(e) => self.host.builtin_failed(PolicyKind::Scheduler, &e),
        }
        self.host.native_answered();
        let (cluster, cursor) = self
            .native
            .get_or_insert_with(|| (Cluster::new(self.snapshot.clone()), 0));
        for entry in &self.log[*cursor..] {
            if entry.by != NATIVE {
                cluster.commit(&convert::request_from_wit(&entry.request), &entry.nodes);
            }
        }
        *cursor = self.log.len();
        match cluster.place(request) {
            Ok(p) => self.accept(
                NATIVE,
                request,
                wit_request,
                p,
                DecidedBy::Native,
                fallback_reason,
            ),
            Err(e) => self.refuse(request, &e, DecidedBy::Native, fallback_reason),
        }
    }

    /// Asks the session of `by` (opening it if needed) to place `request`.
    fn try_session(
        &mut self,
        by: Placer,
        binding: Option<&Arc<Binding>>,
        request: &PlacementRequest,
        wit_request: &ws::PlacementRequest,
    ) -> Result<(Placement, SessionId), CallError> {
        let pos = match self.sessions.iter().position(|s| s.by == by) {
            Some(pos) => pos,
            None => {
                let loaded = match binding {
                    Some(b) => &b.loaded,
                    None => self.host.builtin(PolicyKind::Scheduler),
                };
                let wit_snapshot = self
                    .wit_snapshot
                    .get_or_insert_with(|| convert::snapshot(self.snapshot));
                let id = self.next_session;
                self.next_session += 1;
                let session = open(
                    &self.host.runtime,
                    (id, by),
                    loaded,
                    binding.cloned(),
                    wit_snapshot,
                )?;
                self.sessions.push(session);
                self.sessions.len() - 1
            }
        };
        let node_count = self.snapshot.nodes.len();
        let result = ask(
            &self.host.runtime,
            &mut self.sessions[pos],
            &self.log,
            request,
            wit_request,
            node_count,
        );
        let id = self.sessions[pos].id;
        if matches!(&result, Err(e) if !matches!(e, CallError::Guest(_))) {
            self.sessions.swap_remove(pos);
        }
        result.map(|p| (p, id))
    }

    fn accept(
        &mut self,
        by: SessionId,
        request: &PlacementRequest,
        wit_request: ws::PlacementRequest,
        placement: Placement,
        decided_by: DecidedBy,
        fallback_reason: Option<String>,
    ) -> PlacementOutcome {
        let names = placement
            .nodes
            .iter()
            .map(|&i| {
                self.snapshot
                    .nodes
                    .get(i as usize)
                    .map(|n| n.name.clone())
                    .unwrap_or_default()
            })
            .collect();
        if !placement.nodes.is_empty() {
            self.log.push(Entry {
                by,
                request: wit_request,
                nodes: placement.nodes.clone(),
            });
        }
        let total = self.snapshot.nodes.len();
        PlacementOutcome {
            service: request.service.clone(),
            nodes: names,
            indices: placement.nodes,
            unplaced: placement.unplaced.map(|rejections| Unplaced {
                message: describe_unplaced(total, &rejections, request),
                rejections,
            }),
            decided_by,
            fallback_reason,
        }
    }

    /// An outcome placing nothing because the policy refused the request (bad params).
    fn refuse(
        &self,
        request: &PlacementRequest,
        error: &str,
        decided_by: DecidedBy,
        fallback_reason: Option<String>,
    ) -> PlacementOutcome {
        let rejections = vec![Rejection {
            filter: Filter::Other(format!("scheduler error: {error}")),
            nodes: 0,
        }];
        PlacementOutcome {
            service: request.service.clone(),
            nodes: Vec::new(),
            indices: Vec::new(),
            unplaced: Some(Unplaced {
                message: format!("cannot place: {error}"),
                rejections,
            }),
            decided_by,
            fallback_reason,
        }
    }
}

/// Instantiates a scheduler and hands it the snapshot.
fn open(
    rt: &Runtime,
    (id, by): (SessionId, Placer),
    loaded: &Loaded,
    binding: Option<Arc<Binding>>,
    snapshot: &ws::Snapshot,
) -> Result<Session, CallError> {
    let Pre::Scheduler(pre) = &loaded.pre else {
        return Err(CallError::Host("not a scheduler".into()));
    };
    let mut store = rt.store(loaded.name.clone());
    let instance = pre
        .instantiate(&mut store)
        .map_err(|e| rt.classify(&store, e))?;
    rt.arm(&mut store, snapshot.nodes.len());
    instance
        .call_set_snapshot(&mut store, snapshot)
        .map_err(|e| rt.classify(&store, e))?
        .map_err(|e| rt.guest_error(e))?;
    Ok(Session {
        id,
        by,
        store,
        instance,
        cursor: 0,
        _binding: binding,
    })
}

/// Brings a session up to date with the log, then asks it to place a request.
fn ask(
    rt: &Runtime,
    session: &mut Session,
    log: &[Entry],
    request: &PlacementRequest,
    wit_request: &ws::PlacementRequest,
    node_count: usize,
) -> Result<Placement, CallError> {
    for entry in &log[session.cursor..] {
        if entry.by != session.id {
            rt.arm(&mut session.store, 0);
            session
                .instance
                .call_commit(&mut session.store, &entry.request, &entry.nodes)
                .map_err(|e| rt.classify(&session.store, e))?;
        }
    }
    session.cursor = log.len();
    rt.arm(&mut session.store, 0);
    let answer = session
        .instance
        .call_place(&mut session.store, wit_request)
        .map_err(|e| rt.classify(&session.store, e))?;
    let placement = convert::placement(answer.map_err(|e| rt.guest_error(e))?);
    placement
        .check(request.replicas, node_count)
        .map_err(CallError::Malformed)?;
    Ok(placement)
}

//! The single sequencer: one task owns the state, applies operations in arrival order, seals
//! each accepted one into a record chained to the last, and hands records to storage in
//! batches (group commit: while appends are in flight, what arrives accumulates into the next
//! one, bounded in records and bytes). Callers are answered only when the append holding their
//! record is acknowledged, and a query is answered once everything applied before it is durable.
//!
//! If an append fails or times out, the state may be ahead of the log: the sequencer fails
//! every waiting caller with `unavailable`, rebuilds the state from storage, and only then
//! takes operations again. Ticks come from the sequencer's own clock, as logged operations,
//! when a task deadline has passed, each firing at most as many deadlines as fit in a record.
//!
//! No record exceeds `max_record_bytes`: the state machine bounds what an operation's record
//! could come to before it is applied ([`State::check_record_size`]), and an operation that
//! could exceed it (a terminate of a very large subtree) is refused with `too_large`, changing
//! nothing.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesOrdered;
use toka_contract::api::storage::{AppendReply, AppendRequest};
use toka_contract::capability::Pattern;
use toka_contract::record::{Chain, Hash};
use toka_contract::spec::Principal;
use toka_contract::wire::{ErrorCode, WireError};
use toka_contract::{Capability, Event, KernelRecord, OpId, Operation};
use toka_runtime::bus::RequestError;
use tokio::sync::{mpsc, oneshot, watch};

use crate::log::KernelLog;
use crate::machine::{self, Authority, Ctx, Outcome, State};
use crate::recovery;

/// What a caller learns when its operation is applied; [`Applied::durable`] says when (and
/// whether) it is durable, and nothing may be acknowledged before that.
#[derive(Debug)]
pub struct Applied {
    /// The outcome.
    pub accepted: Accepted,
    /// Resolves once the record (and everything before it) is durable, or fails with
    /// `unavailable` if the append failed.
    pub durable: oneshot::Receiver<Result<(), WireError>>,
}

/// An applied operation's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The record's sequence (the first application's, for a duplicate).
    pub seq: u64,
    /// The sequencer's time for it.
    pub time_us: u64,
    /// Its events.
    pub events: Vec<Event>,
    /// For a spawn: what the new agent's token is delegated, read from the state as the
    /// spawn was applied.
    pub agent_grant: Option<AgentGrant>,
    /// For a claim: the task's payload.
    pub task_payload: Option<String>,
}

/// What a spawned agent's token is delegated from its spawner's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentGrant {
    /// `agent:<new>/**` with the actions of the spawner's widest capability covering it.
    pub capability: Capability,
    /// Whether that capability covers the new agent only through its descent (`agent:<x>/**`
    /// for an ancestor x), which auth checks in the kernel log: the spawn must be durable
    /// before the token is asked for. `agent:*` covers it without.
    pub through_descent: bool,
}

/// A question answered from the state.
pub type Query = Box<dyn FnOnce(&State) -> Box<dyn FnOnce() + Send> + Send>;

/// What the sequencer takes.
pub enum Input {
    /// An operation from a verified caller.
    Submit {
        /// Its idempotency key.
        op_id: OpId,
        /// The caller.
        principal: Principal,
        /// What the caller's token allows.
        caps: Vec<Capability>,
        /// The operation.
        op: Operation,
        /// Where the outcome goes, as soon as it is applied (or refused).
        reply: oneshot::Sender<Result<Applied, WireError>>,
    },
    /// A query: computed on the state at once, its answer released once what was applied
    /// before it is durable.
    Query(Query),
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Submit { op_id, .. } => f.debug_struct("Submit").field("op_id", op_id).finish_non_exhaustive(),
            Input::Query(_) => f.write_str("Query"),
        }
    }
}

/// The sequencer's clock: microseconds since the Unix epoch.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(Arc::new(toka_runtime::now_us))
    }

    /// A clock reading `now`.
    pub fn new(now: impl Fn() -> u64 + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(now))
    }

    fn now_us(&self) -> u64 {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// The sequencer's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The most records in one append.
    pub max_batch_records: usize,
    /// The most bytes of records in one append (under NATS's payload limit).
    pub max_batch_bytes: usize,
    /// The most bytes of one record: an operation whose record could exceed it is refused
    /// before it is applied, and a tick fires only as many deadlines as fit.
    pub max_record_bytes: usize,
    /// Appends in flight at once.
    pub max_in_flight: usize,
    /// How often to look for passed deadlines.
    pub tick: Duration,
    /// Snapshot after this many records (0: never).
    pub snapshot_every: u64,
    /// The idempotency window for a state rebuilt from nothing.
    pub idempotency_window: u64,
    /// The time the sequencer stamps on operations and compares deadlines with.
    pub clock: Clock,
}

/// Something waiting on a batch: called with the batch's outcome.
type Waiter = Box<dyn FnOnce(Result<(), WireError>) + Send>;

#[derive(Default)]
struct Batch {
    records: Vec<KernelRecord>,
    /// Each record's encoded length.
    sizes: Vec<usize>,
    bytes: usize,
    waiters: Vec<Waiter>,
}

/// The sequencer's principal, on the ticks it issues.
pub const SEQUENCER: &str = "toka-kernel";

fn unavailable(why: &str) -> WireError {
    WireError::new(ErrorCode::Unavailable, format!("the kernel is {why}; retry")).with_retry_after_ms(200)
}

type AppendResult = (Result<AppendReply, RequestError>, Vec<Waiter>, u64);

/// The sequencer task, appending to the log `L`.
pub struct Sequencer<L> {
    log: L,
    settings: Settings,
    state: State,
    head_hash: Hash,
    pending: Batch,
    in_flight: FuturesOrdered<std::pin::Pin<Box<dyn std::future::Future<Output = AppendResult> + Send>>>,
    last_snapshot: u64,
    /// The snapshot being encoded or uploaded.
    snapshotting: Option<tokio::task::JoinHandle<()>>,
    hash: watch::Sender<(u64, Hash)>,
}

impl<L> std::fmt::Debug for Sequencer<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequencer").field("seq", &self.state.last_seq()).finish_non_exhaustive()
    }
}

impl<L: KernelLog> Sequencer<L> {
    /// A sequencer continuing from `recovered`; `hash` reports (durable seq, state hash) after
    /// each commit that leaves nothing pending.
    pub fn new(log: L, settings: Settings, recovered: recovery::Recovered, hash: watch::Sender<(u64, Hash)>) -> Self {
        let last_snapshot = recovered.snapshot_seq;
        Sequencer {
            log,
            settings,
            state: recovered.state,
            head_hash: recovered.head_hash,
            pending: Batch::default(),
            in_flight: FuturesOrdered::new(),
            last_snapshot,
            snapshotting: None,
            hash,
        }
    }

    /// Runs until `stop` turns true (or the inputs close); what is in flight is finished
    /// first.
    pub async fn run(mut self, mut inputs: mpsc::Receiver<Input>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.settings.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.report();
        let mut open = true;
        while open || !self.in_flight.is_empty() || !self.pending.records.is_empty() {
            let room = self.pending.records.len() < self.settings.max_batch_records;
            tokio::select! {
                input = inputs.recv(), if open && room => match input {
                    Some(input) => {
                        self.take(input);
                        // Take what else is queued before sending: that is the group.
                        while self.pending.records.len() < self.settings.max_batch_records {
                            match inputs.try_recv() {
                                Ok(input) => self.take(input),
                                Err(_) => break,
                            }
                        }
                    }
                    None => open = false,
                },
                Some((result, waiters, last_seq)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    if !self.committed(result, waiters, last_seq) {
                        self.fail_all().await;
                        self.rebuild(&mut inputs).await;
                    }
                }
                changed = stop.changed(), if open => {
                    let stopping = changed.is_err() || *stop.borrow();
                    open = !stopping;
                }
                _ = tick.tick() => self.tick(),
            }
            self.send();
        }
    }

    /// Publishes (durable seq, state hash) to whoever watches (tests, tools). Hashing walks
    /// the whole state, so nothing is computed when nobody watches.
    fn report(&self) {
        if self.hash.receiver_count() == 0 {
            return;
        }
        if let Ok(hash) = self.state.hash() {
            let _ = self.hash.send((self.state.last_seq(), hash));
        }
    }

    fn take(&mut self, input: Input) {
        match input {
            Input::Query(query) => {
                let answer = query(&self.state);
                self.wait(Box::new(move |_| answer()));
            }
            Input::Submit { op_id, principal, caps, op, reply } => {
                let authority = Authority::Client(&caps);
                match self.apply(&op, op_id, &principal, authority) {
                    Ok(mut accepted) => {
                        self.detail(&caps, &mut accepted);
                        let (durable, done) = oneshot::channel();
                        let _ = reply.send(Ok(Applied { accepted, durable: done }));
                        self.wait(Box::new(move |outcome| {
                            let _ = durable.send(outcome);
                        }))
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
    }

    /// What the reply to an accepted spawn or claim carries besides its events, read now
    /// rather than by a later query that would wait for another commit.
    fn detail(&self, caps: &[Capability], accepted: &mut Accepted) {
        match accepted.events.first() {
            Some(Event::AgentSpawned { agent, .. }) => {
                let subtree = Pattern::Subtree(*agent);
                accepted.agent_grant = self.state.widest_covering(caps, &subtree).map(|c| AgentGrant {
                    through_descent: !matches!(c.resource, Pattern::AnyAgent),
                    capability: Capability { resource: subtree, actions: c.actions },
                });
            }
            Some(Event::TaskClaimed { task, .. }) => {
                accepted.task_payload = self.state.task_payload(*task).map(str::to_owned);
            }
            _ => {}
        }
    }

    /// Releases `waiter` once everything applied so far is durable.
    fn wait(&mut self, waiter: Waiter) {
        if self.pending.records.is_empty() && self.in_flight.is_empty() {
            waiter(Ok(()));
        } else {
            self.pending.waiters.push(waiter);
        }
    }

    /// Applies and seals one operation into the pending batch.
    fn apply(
        &mut self,
        op: &Operation,
        op_id: OpId,
        principal: &Principal,
        authority: Authority<'_>,
    ) -> Result<Accepted, WireError> {
        let seq = self.state.last_seq() + 1;
        let time_us = self.settings.clock.now_us().max(self.state.last_time_us());
        let ctx = Ctx { seq, time_us, op_id, principal, authority };
        self.state.check_record_size(op, self.settings.max_record_bytes).map_err(|e| WireError::from(&e))?;
        match self.state.apply(op, &ctx) {
            Ok(Outcome::Applied(events)) => {
                let mut chain = Chain { seq: seq - 1, hash: self.head_hash };
                let (record, size) = chain
                    .seal(op_id, principal.clone(), time_us, op.clone(), events.clone())
                    .map_err(|e| WireError::new(ErrorCode::Internal, format!("sealing record {seq}: {e}")))?;
                self.head_hash = chain.hash;
                self.pending.bytes += size;
                self.pending.sizes.push(size);
                self.pending.records.push(record);
                Ok(Accepted { seq, time_us, events, agent_grant: None, task_payload: None })
            }
            // The first result, released (by the caller's wait) once it is durable.
            Ok(Outcome::Duplicate { seq, events }) => {
                Ok(Accepted { seq, time_us: 0, events, agent_grant: None, task_payload: None })
            }
            Err(e) => Err(WireError::from(&e)),
        }
    }

    /// Issues a tick when a deadline has passed.
    fn tick(&mut self) {
        let now = self.settings.clock.now_us();
        if self.state.next_deadline_us().is_none_or(|d| d > now) {
            return;
        }
        let seq = self.state.last_seq() + 1;
        let op_id = OpId::mint(now.max(self.state.last_time_us()), seq, u16::MAX);
        let Ok(principal) = SEQUENCER.parse::<Principal>() else { return };
        // What is left fires at the next tick.
        let tick = Operation::Tick { max_fired: Some(machine::max_fired_within(self.settings.max_record_bytes)) };
        if let Err(e) = self.apply(&tick, op_id, &principal, Authority::Sequencer) {
            tracing::error!(error = %e.message, "tick refused");
        }
    }

    /// Sends the pending batch if an append slot is free, or if it is full.
    fn send(&mut self) {
        if self.pending.records.is_empty() || self.in_flight.len() >= self.settings.max_in_flight {
            return;
        }
        // Split at the byte bound: a batch never exceeds it unless one record alone does.
        let mut batch = std::mem::take(&mut self.pending);
        let mut rest = Batch::default();
        if batch.bytes > self.settings.max_batch_bytes && batch.records.len() > 1 {
            let mut bytes = 0;
            let cut = batch
                .sizes
                .iter()
                .position(|size| {
                    bytes += size;
                    bytes > self.settings.max_batch_bytes
                })
                .unwrap_or(batch.records.len())
                .max(1);
            bytes = batch.sizes[..cut].iter().sum();
            rest.records = batch.records.split_off(cut);
            rest.sizes = batch.sizes.split_off(cut);
            rest.bytes = batch.bytes.saturating_sub(bytes);
            // Waiters wait for everything before them: they ride with the later part.
            rest.waiters = std::mem::take(&mut batch.waiters);
        }
        self.pending = rest;
        let last_seq = batch.records.last().map_or(0, |r| r.seq);
        let request = AppendRequest { expected_seq: batch.records[0].seq, records: batch.records };
        let log = self.log.clone();
        let waiters = batch.waiters;
        self.in_flight.push_back(Box::pin(async move {
            let result = log.append(request).await;
            (result, waiters, last_seq)
        }));
    }

    /// Releases the waiters of a committed batch; `false` (after failing them) when the append
    /// failed and the state must be rebuilt.
    fn committed(&mut self, result: Result<AppendReply, RequestError>, waiters: Vec<Waiter>, last_seq: u64) -> bool {
        match result {
            Ok(reply) if reply.last_seq == last_seq => {
                for waiter in waiters {
                    waiter(Ok(()));
                }
                if self.in_flight.is_empty() && self.pending.records.is_empty() {
                    // Queries and duplicates that arrived while only appends were in flight.
                    for waiter in std::mem::take(&mut self.pending.waiters) {
                        waiter(Ok(()));
                    }
                    self.report();
                    self.maybe_snapshot();
                }
                true
            }
            outcome => {
                let why = match outcome {
                    Ok(reply) => format!("storage acknowledged up to {} where {last_seq} was sent", reply.last_seq),
                    Err(e) => e.to_string(),
                };
                tracing::error!(error = %why, "append failed: rebuilding the state from the log");
                let error = unavailable("rebuilding its state after a failed append");
                for waiter in waiters {
                    waiter(Err(error.clone()));
                }
                false
            }
        }
    }

    /// Fails everything waiting: this batch, those in flight after it (waited for, so the
    /// rebuild reads a log nobody is still appending to), the pending one. An append that
    /// landed after all is in the rebuilt state; its caller's retry with the same operation id
    /// gets the first result.
    async fn fail_all(&mut self) {
        let error = unavailable("rebuilding its state after a failed append");
        let pending = std::mem::take(&mut self.pending);
        for waiter in pending.waiters {
            waiter(Err(error.clone()));
        }
        while let Some((_, waiters, _)) = self.in_flight.next().await {
            for waiter in waiters {
                waiter(Err(error.clone()));
            }
        }
    }

    /// Replaces the state with what the log holds, retrying until storage answers; meanwhile
    /// every input is refused with `unavailable` rather than queued.
    async fn rebuild(&mut self, inputs: &mut mpsc::Receiver<Input>) {
        let mut wait = Duration::from_millis(100);
        loop {
            refuse_queued(inputs);
            match recovery::recover(&self.log, self.settings.idempotency_window).await {
                Ok(recovered) => {
                    tracing::info!(seq = recovered.state.last_seq(), replayed = recovered.replayed, "state rebuilt");
                    self.state = recovered.state;
                    self.head_hash = recovered.head_hash;
                    self.report();
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot rebuild yet");
                    let until = tokio::time::Instant::now() + wait;
                    while let Ok(Some(input)) = tokio::time::timeout_at(until, inputs.recv()).await {
                        refuse(input);
                    }
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn maybe_snapshot(&mut self) {
        let seq = self.state.last_seq();
        if self.settings.snapshot_every == 0 || seq < self.last_snapshot + self.settings.snapshot_every {
            return;
        }
        if self.snapshotting.as_ref().is_some_and(|task| !task.is_finished()) {
            // The previous one is still encoding or uploading: try again at a later commit.
            return;
        }
        self.last_snapshot = seq;
        // The state's collections share structure, so this copy takes a moment whatever the
        // state's size; encoding and compressing (about 330 and 40 ms for 41 MB here) and the
        // upload run on other threads while the sequencer goes on. The pause is logged: it is
        // what a snapshot costs callers.
        let started = std::time::Instant::now();
        let state = self.state.clone();
        let pause_us = started.elapsed().as_micros() as u64;
        let log = self.log.clone();
        self.snapshotting = Some(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let packed = tokio::task::spawn_blocking(move || {
                let encoded = state.encode().map_err(|e| format!("state does not encode: {e}"))?;
                let stored = recovery::pack(&encoded).map_err(|e| format!("state does not compress: {e}"))?;
                Ok::<_, String>((machine::hash_encoded(&encoded), encoded.len(), stored))
            });
            let (state_hash, bytes, stored) = match packed.await {
                Ok(Ok(packed)) => packed,
                Ok(Err(e)) => return tracing::error!(error = %e, "snapshot not taken"),
                Err(e) => return tracing::error!(error = %e, "snapshot encoding failed"),
            };
            let encode_ms = started.elapsed().as_millis() as u64;
            let started = std::time::Instant::now();
            match recovery::put_snapshot(&log, seq, state_hash, &stored).await {
                Ok(()) => {
                    let upload_ms = started.elapsed().as_millis() as u64;
                    let stored_bytes = stored.len();
                    tracing::info!(seq, bytes, stored_bytes, pause_us, encode_ms, upload_ms, "snapshot stored");
                }
                Err(e) => tracing::warn!(seq, error = %e.message, "snapshot not stored"),
            }
        }));
    }
}

fn refuse(input: Input) {
    let error = unavailable("rebuilding its state from the log (storage unreachable)");
    match input {
        Input::Submit { reply, .. } => {
            let _ = reply.send(Err(error));
        }
        // A query's answer is computed on a state that is being replaced: dropping it makes
        // its caller's wait fail with `unavailable`.
        Input::Query(_) => {}
    }
}

fn refuse_queued(inputs: &mut mpsc::Receiver<Input>) {
    while let Ok(input) = inputs.try_recv() {
        refuse(input);
    }
}

#[cfg(test)]
mod tests;

//! The bound on a record's size: what an operation's record could come to, computed before it
//! is applied, so that the sequencer refuses (or, for a tick, limits) an operation whose record
//! would not fit instead of changing the state and failing to store it.
//!
//! A record is its envelope (sequence, time, operation id, principal, hashes), its operation
//! and its events, in compact JSON. The operation's size is measured; its events are bounded
//! from the state without applying anything: exactly for a terminate (which cascades through
//! a subtree), by [`MAX_DEADLINE_EVENTS_BYTES`] per deadline for a tick, and otherwise by the
//! texts of the operation that its events repeat plus a fixed allowance.

use serde::Serialize;
use toka_contract::Operation;

use super::{Error, State};

/// The most bytes of a record besides its operation and its events: the member names, the
/// sequence and time, the operation id, a principal of the longest kind, the two hashes.
pub const RECORD_ENVELOPE_BYTES: usize = 512;

/// The most bytes (compact JSON, with a separating comma) of the events one fired deadline
/// produces: `task.timed_out`, and `task.parked` after the last attempt.
pub const MAX_DEADLINE_EVENTS_BYTES: usize = 320;

/// The most bytes of an operation's events besides the texts they repeat from the operation:
/// type names, ids, numbers, a principal, a name or an observation kind, for at most two events.
const EVENTS_ALLOWANCE_BYTES: usize = 1_024;

/// The length of `value` in compact JSON.
pub fn json_len<T: Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Serializing the contract's types into a counter cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// How many deadlines a tick may fire for its record to stay within `max_record_bytes`
/// (at least one).
pub fn max_fired_within(max_record_bytes: usize) -> u32 {
    let tick_op = json_len(&Operation::Tick { max_fired: Some(u32::MAX) });
    let room = max_record_bytes.saturating_sub(RECORD_ENVELOPE_BYTES + tick_op + 2);
    u32::try_from(room / MAX_DEADLINE_EVENTS_BYTES).unwrap_or(u32::MAX).max(1)
}

impl State {
    /// Refuses `op` if its record could exceed `max_record_bytes`, computed on the state as it
    /// is, before anything changes. A tick must carry a `max_fired` that fits
    /// ([`max_fired_within`]).
    pub fn check_record_size(&self, op: &Operation, max_record_bytes: usize) -> Result<(), Error> {
        let bytes = RECORD_ENVELOPE_BYTES + json_len(op) + self.events_bound(op);
        if bytes > max_record_bytes {
            return Err(Error::RecordTooLarge { bytes, limit: max_record_bytes });
        }
        Ok(())
    }

    /// At least the length of the JSON array of the events `op` produces if applied now.
    pub(super) fn events_bound(&self, op: &Operation) -> usize {
        match op {
            Operation::TerminateAgent { agent, reason } => {
                self.terminate_plan(*agent, reason).map_or(2, |(_, events)| json_len(&events))
            }
            Operation::Tick { max_fired } => {
                let fired = max_fired.map_or(self.deadlines.len(), |n| n as usize);
                2 + fired.saturating_mul(MAX_DEADLINE_EVENTS_BYTES)
            }
            // `task.failed` and, after the last attempt, `task.parked` both repeat the error.
            Operation::FailTask { error, .. } => 2 * json_len(error.as_str()) + EVENTS_ALLOWANCE_BYTES,
            Operation::EmitObservation { body, .. } => json_len(body.as_str()) + EVENTS_ALLOWANCE_BYTES,
            Operation::SuspendAgent { reason, .. } | Operation::CancelTask { reason, .. } => {
                json_len(reason.as_str()) + EVENTS_ALLOWANCE_BYTES
            }
            Operation::ClaimTask { worker, .. } => json_len(worker.as_str()) + EVENTS_ALLOWANCE_BYTES,
            // Spawn (a name, limits), schedule (not the payload), complete (not the result),
            // heartbeat, resume, reports.
            _ => EVENTS_ALLOWANCE_BYTES,
        }
    }
}

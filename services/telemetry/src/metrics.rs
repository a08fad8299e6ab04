//! The views as Prometheus series, computed from them at each scrape of `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use toka_contract::record::LogName;

use crate::views::{AuditViews, Histogram, SECONDS_BUCKETS, Views};

/// Serves the views on the host's `/metrics` (as `toka_*`): the kernel log's, the audit log's,
/// and how far each consumer is behind its stream.
#[derive(Debug, Clone, Default)]
pub struct ViewsCollector {
    /// The kernel log's views.
    pub views: Arc<Mutex<Views>>,
    /// The audit log's views.
    pub audit: Arc<Mutex<AuditViews>>,
    kernel_lag: Arc<AtomicU64>,
    audit_lag: Arc<AtomicU64>,
}

/// A state's name on the wire (`running`, `timed_out`, ...).
fn name_of(state: impl serde::Serialize) -> String {
    serde_json::to_value(state).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

fn histogram(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    h: &Histogram,
) -> Result<(), std::fmt::Error> {
    // The encoder sums the buckets itself; the last, unbounded one is `+Inf`.
    let within: u64 = h.buckets.iter().sum();
    let buckets: Vec<(f64, u64)> = SECONDS_BUCKETS
        .iter()
        .copied()
        .zip(h.buckets.iter().copied())
        .chain([(f64::INFINITY, h.count - within)])
        .collect();
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    metric.encode_histogram::<NoLabelSet>(h.sum, h.count, &buckets, None)
}

impl Collector for ViewsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.encode_audit(&mut encoder)?;
        let Ok(views) = self.views.lock() else { return Ok(()) };
        let now_us = toka_runtime::now_us();
        let mut agents = encoder.encode_descriptor("agents", "Agents in each state", None, MetricType::Gauge)?;
        for (state, n) in views.agents_by_state() {
            ConstGauge::new(n as i64).encode(agents.encode_family(&[("state", name_of(state))])?)?;
        }
        let mut tasks = encoder.encode_descriptor("tasks", "Tasks in each queue and state", None, MetricType::Gauge)?;
        for ((queue, state), n) in views.tasks_by_queue_and_state() {
            let labels = [("queue", queue.to_string()), ("state", name_of(state))];
            ConstGauge::new(n as i64).encode(tasks.encode_family(&labels)?)?;
        }
        let mut ready = encoder.encode_descriptor(
            "queue_ready",
            "Tasks a worker could claim now: scheduled, owner running",
            None,
            MetricType::Gauge,
        )?;
        for (queue, n) in views.ready_by_queue() {
            ConstGauge::new(n as i64).encode(ready.encode_family(&[("queue", queue.to_string())])?)?;
        }
        let mut oldest = encoder.encode_descriptor(
            "queue_oldest_ready_seconds",
            "How long the oldest ready task of each queue has waited (0 without one)",
            None,
            MetricType::Gauge,
        )?;
        for (queue, seconds) in views.oldest_ready_seconds(now_us) {
            ConstGauge::new(seconds).encode(oldest.encode_family(&[("queue", queue.to_string())])?)?;
        }
        histogram(
            &mut encoder,
            "task_schedule_to_claim_seconds",
            "From a task becoming claimable to its claim",
            views.schedule_to_claim(),
        )?;
        histogram(
            &mut encoder,
            "task_claim_to_complete_seconds",
            "From a claim to the task's completion",
            views.claim_to_complete(),
        )?;
        for (name, help, value) in [
            ("task_retries", "Attempts that failed or timed out and were retried", views.retries()),
            ("task_timeouts", "Task deadlines that fired", views.timeouts()),
        ] {
            encoder
                .encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
        }
        let mut head = encoder.encode_descriptor(
            "log_head",
            "The last record of the log telemetry has folded",
            None,
            MetricType::Gauge,
        )?;
        let seq = views.last().map_or(0, |(seq, _)| seq);
        ConstGauge::new(seq as i64).encode(head.encode_family(&[("log", "kernel")])?)?;
        let audit_seq = self.audit.lock().ok().and_then(|a| a.last()).map_or(0, |(seq, _)| seq);
        ConstGauge::new(audit_seq as i64).encode(head.encode_family(&[("log", "audit")])?)?;
        let mut lag = encoder.encode_descriptor(
            "telemetry_lag_events",
            "Events of each log's stream not yet delivered to telemetry",
            None,
            MetricType::Gauge,
        )?;
        for (log, n) in [("kernel", &self.kernel_lag), ("audit", &self.audit_lag)] {
            ConstGauge::new(n.load(Ordering::Relaxed) as i64).encode(lag.encode_family(&[("log", log)])?)?;
        }
        Ok(())
    }
}

impl ViewsCollector {
    /// Where the consumer of `log` keeps its lag.
    pub fn lag(&self, log: LogName) -> Arc<AtomicU64> {
        match log {
            LogName::Kernel => self.kernel_lag.clone(),
            LogName::Audit => self.audit_lag.clone(),
        }
    }

    fn encode_audit(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Ok(audit) = self.audit.lock() else { return Ok(()) };
        let mut tokens =
            encoder.encode_descriptor("tokens", "Tokens issued, delegated and revoked", None, MetricType::Counter)?;
        for (kind, n) in audit.tokens() {
            tokens.encode_family(&[("kind", kind)])?.encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }
        let mut denials = encoder.encode_descriptor(
            "access_denials",
            "Requests refused, by action (the audit log's aggregated denials)",
            None,
            MetricType::Counter,
        )?;
        for (action, n) in audit.denials() {
            denials.encode_family(&[("action", action.as_str())])?.encode_counter::<NoLabelSet, _, u64>(n, None)?;
        }
        if let Some(at) = audit.last_rotation_us() {
            let age = toka_runtime::now_us().saturating_sub(at) as f64 / 1e6;
            let key = encoder.encode_descriptor(
                "signing_key_age_seconds",
                "Time since auth's signing key last changed",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(age).encode(key)?;
        }
        Ok(())
    }
}

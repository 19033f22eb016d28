//! DeliveryActor: one per broker. Owns the broker's HTTP client, its in-memory lanes (one per
//! load, bounded by `delivery.mailbox_capacity`) and its in-flight limit. The ledger is the truth
//! (docs/design.md 1): whatever is not in memory is pending in the ledger and is loaded in
//! (partition, offset) order when there is room.
//!
//! One attempt is four small steps: `dispatch` picks what may go, `attempt` makes the call,
//! `record_outcome` classifies it with the policy, `save_outcomes` writes a batch to the ledger
//! and only then frees the load's lane for its next delivery.

mod handlers;

use std::time::{Duration, Instant};

use actix::{
    Actor, ActorContext, ActorFutureExt, Addr, AsyncContext, Context, SpawnHandle, WrapFuture,
};
use chrono::Utc;
use rand::Rng;

pub use handlers::*;

use crate::actors::ledger_gateway::{
    DisableBroker, LedgerGateway, LoadBroker, LoadPending, RecordAttempts, RecordCircuit,
};
use crate::broker::{BrokerEndpoint, EndpointError};
use crate::circuit_breaker::{BreakerConfig, CircuitBreaker, Transition};
use crate::config::DeliverySettings;
use crate::core::policy::{classify, parse_retry_after, AttemptResult, RetryPolicy, Verdict};
use crate::core::signing::{signature_header, webhook_id};
use crate::delivery_queue::{Finish, LoadQueues};
use crate::lease::LeaseBook;
use crate::ledger::CircuitRecord;
use crate::ledger::{AttemptOutcome, AttemptRecord, PendingDelivery};
use crate::metrics::circuit_state_value;
use crate::webhook_client::{self, WebhookRequest};

/// How long a loaded broker row is trusted before it is read again (URL or secret changes).
const ENDPOINT_REFRESH: Duration = Duration::from_secs(5);
/// Messages waiting in the actix mailbox; each carries a batch of deliveries.
const MAILBOX_MESSAGES: usize = 64;

#[derive(Clone)]
pub struct DeliveryDeps {
    pub ledger: Addr<LedgerGateway>,
    pub leases: LeaseBook,
    pub settings: DeliverySettings,
    pub retry: RetryPolicy,
    pub breaker: BreakerConfig,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    pub instance_id: String,
}

enum Endpoint {
    Unknown,
    Loading,
    Loaded {
        endpoint: Result<BrokerEndpoint, Unusable>,
        at: Instant,
    },
}

/// Why a broker's endpoint gets no requests: a broken `brokers` row, or a URL the SSRF guard
/// refuses. Decided once per endpoint load; each delivery is then dead-lettered with it.
#[derive(Clone)]
struct Unusable {
    class: &'static str,
    reason: String,
}

/// A broker's live state on this instance (admin API `GET /brokers`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BrokerSnapshot {
    pub broker_id: String,
    pub circuit_state: &'static str,
    pub circuit_since: chrono::DateTime<Utc>,
    pub circuit_open_until: Option<chrono::DateTime<Utc>>,
    pub consecutive_failures: u32,
    pub in_flight: usize,
    pub in_memory: usize,
}

/// What one attempt produced, in the terms the policy and the ledger need.
struct AttemptReport {
    started_at: chrono::DateTime<Utc>,
    latency: Duration,
    result: AttemptResult,
    status_code: Option<u16>,
    /// (error class, message) for anything but a 2xx.
    error: Option<(&'static str, String)>,
}

impl AttemptReport {
    fn from_response(
        response: Result<webhook_client::WebhookResponse, webhook_client::SendError>,
        started_at: chrono::DateTime<Utc>,
        latency: Duration,
    ) -> AttemptReport {
        let (result, status_code, error) = match response {
            Ok(response) => (
                AttemptResult::Responded {
                    status: response.status,
                    retry_after: response
                        .retry_after
                        .as_deref()
                        .and_then(|value| parse_retry_after(value, Utc::now())),
                },
                Some(response.status),
                (!(200..300).contains(&response.status)).then(|| {
                    (
                        "http_status",
                        format!("HTTP {}: {}", response.status, response.body_excerpt),
                    )
                }),
            ),
            // The SSRF guard refused the resolved address: permanent, like a bad URL.
            Err(error @ webhook_client::SendError::Refused(_)) => (
                AttemptResult::RequestInvalid,
                None,
                Some((error.class(), error.to_string())),
            ),
            Err(error) => (
                AttemptResult::TransportFailed,
                None,
                Some((error.class(), error.to_string())),
            ),
        };
        AttemptReport {
            started_at,
            latency,
            result,
            status_code,
            error,
        }
    }

    /// A request we decided not to make (invalid broker row, refused URL).
    fn not_sent(class: &'static str, reason: String) -> AttemptReport {
        AttemptReport {
            started_at: Utc::now(),
            latency: Duration::ZERO,
            result: AttemptResult::RequestInvalid,
            status_code: None,
            error: Some((class, reason)),
        }
    }
}

/// An attempt whose outcome is decided but not yet written to the ledger.
struct UnsavedOutcome {
    load_id: String,
    record: AttemptRecord,
}

pub struct DeliveryActor {
    broker_id: String,
    deps: DeliveryDeps,
    client: awc::Client,
    network_policy: std::sync::Arc<crate::core::ssrf::NetworkPolicy>,
    endpoint: Endpoint,
    lanes: LoadQueues<PendingDelivery>,
    breaker: CircuitBreaker,
    /// Attempts started whose outcome is not yet saved.
    in_flight: usize,
    /// Bumped whenever pending deliveries may exist in the ledger that are not in `lanes`.
    ledger_load_wanted: u64,
    /// The `ledger_load_wanted` value at the start of the last load that found everything.
    ledger_load_done: u64,
    loading_from_ledger: bool,
    unsaved: Vec<UnsavedOutcome>,
    saving: bool,
    draining: Vec<tokio::sync::oneshot::Sender<()>>,
    is_draining: bool,
    wakeup: Option<SpawnHandle>,
}

impl DeliveryActor {
    pub fn new(broker_id: String, deps: DeliveryDeps) -> Self {
        let network_policy = std::sync::Arc::new(deps.settings.network_policy());
        let client = webhook_client::build_client(
            &deps.settings.user_agent,
            deps.settings.request_timeout(),
            network_policy.clone(),
        );
        let lanes = LoadQueues::new(deps.settings.mailbox_capacity);
        let breaker = CircuitBreaker::new(deps.breaker, Instant::now());
        DeliveryActor {
            network_policy,
            breaker,
            broker_id,
            deps,
            client,
            endpoint: Endpoint::Unknown,
            lanes,
            in_flight: 0,
            // A new actor knows nothing yet: look in the ledger first.
            ledger_load_wanted: 1,
            ledger_load_done: 0,
            loading_from_ledger: false,
            unsaved: Vec::new(),
            saving: false,
            draining: Vec::new(),
            is_draining: false,
            wakeup: None,
        }
    }

    /// Starts as many attempts as the in-flight limit allows, then arranges to be called again.
    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        if self.is_draining {
            return;
        }
        let endpoint = match &self.endpoint {
            Endpoint::Loaded { endpoint, at } if at.elapsed() < ENDPOINT_REFRESH => {
                endpoint.clone()
            }
            Endpoint::Loading => return,
            _ => return self.load_endpoint(ctx),
        };
        let now = Instant::now();
        let request_timeout = self.deps.settings.request_timeout();
        while self.in_flight < self.deps.settings.max_in_flight_per_broker
            && self.lanes.has_ready(now)
        {
            // While the circuit is open the deliveries just wait: no request, no attempt spent.
            let (allowed, transition) = self.breaker.try_acquire(now);
            if let Some(transition) = transition {
                self.log_transition(&transition);
            }
            if !allowed {
                break;
            }
            let Some((load_id, delivery)) = self.lanes.pop_ready(now) else {
                break;
            };
            let delivery = delivery.clone();
            if !self
                .deps
                .leases
                .may_send(delivery.partition, now, request_timeout)
            {
                // Not ours to send (any more): it stays pending for the partition's owner.
                self.lanes.forget_lane(&load_id);
                continue;
            }
            #[cfg(feature = "fault-injection")]
            crate::fault_injection::maybe_panic_in_delivery(&self.broker_id);
            self.in_flight += 1;
            match &endpoint {
                Ok(endpoint) => self.attempt(ctx, load_id, delivery, endpoint),
                Err(unusable) => self.record_outcome(
                    ctx,
                    load_id,
                    &delivery,
                    AttemptReport::not_sent(unusable.class, unusable.reason.clone()),
                ),
            }
        }
        self.load_from_ledger(ctx);
        self.schedule_wakeup(ctx);
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let metrics = &self.deps.metrics;
        let broker = [self.broker_id.as_str()];
        metrics
            .mailbox_depth
            .with_label_values(&broker)
            .set(self.lanes.len() as i64);
        metrics
            .in_flight
            .with_label_values(&broker)
            .set(self.in_flight as i64);
    }

    fn attempt(
        &mut self,
        ctx: &mut Context<Self>,
        load_id: String,
        delivery: PendingDelivery,
        endpoint: &BrokerEndpoint,
    ) {
        let started_at = Utc::now();
        let id = webhook_id(&delivery.key);
        let request = WebhookRequest {
            url: endpoint.url.clone(),
            signature: signature_header(
                &endpoint.secrets,
                &id,
                started_at.timestamp(),
                &delivery.payload,
            ),
            webhook_id: id,
            timestamp: started_at.timestamp(),
            sequence: delivery.offset,
            body: delivery.payload.clone(),
        };
        let client = self.client.clone();
        let timeout = self.deps.settings.request_timeout();
        let max_response_bytes = self.deps.settings.max_response_bytes;
        let call = async move {
            webhook_client::send(&client, &request, timeout, max_response_bytes).await
        };
        ctx.spawn(
            call.into_actor(self)
                .map(move |(result, latency), act, ctx| {
                    act.guarded(ctx, "record_outcome", move |act, ctx| {
                        let report = AttemptReport::from_response(result, started_at, latency);
                        act.record_outcome(ctx, load_id, &delivery, report);
                    });
                }),
        );
    }

    /// Applies the policy to one attempt, logs it, and queues it for the ledger.
    fn record_outcome(
        &mut self,
        ctx: &mut Context<Self>,
        load_id: String,
        delivery: &PendingDelivery,
        report: AttemptReport,
    ) {
        let AttemptReport {
            started_at,
            latency,
            result,
            status_code,
            error,
        } = report;
        let attempt = delivery.attempts + 1;
        let verdict = classify(&result);
        let breaker_change = match (&result, verdict) {
            (AttemptResult::RequestInvalid, _) => None,
            (_, Verdict::Retry) => self.breaker.on_failure(Instant::now()),
            _ => self.breaker.on_success(Instant::now()),
        };
        if let Some(transition) = breaker_change {
            self.log_transition(&transition);
        }
        let outcome = match verdict {
            Verdict::Delivered => AttemptOutcome::Delivered,
            Verdict::Retry => {
                let retry_after = match &result {
                    AttemptResult::Responded { retry_after, .. } => *retry_after,
                    _ => None,
                };
                match self
                    .deps
                    .retry
                    .next_delay(attempt, retry_after, rand::rng().random::<f64>())
                {
                    Some(delay) => AttemptOutcome::RetryIn(delay),
                    None => AttemptOutcome::Dead {
                        reason: format!("gave up after {attempt} attempts"),
                    },
                }
            }
            Verdict::Dead => AttemptOutcome::Dead {
                reason: match (&error, status_code) {
                    (_, Some(code)) => format!("permanent failure: HTTP {code}"),
                    (Some((_, message)), None) => message.clone(),
                    (None, None) => "permanent failure".to_owned(),
                },
            },
            Verdict::DeadAndDisableBroker => AttemptOutcome::Dead {
                reason: "broker answered 410 Gone; broker disabled".to_owned(),
            },
        };
        let metrics = &self.deps.metrics;
        metrics
            .deliveries
            .with_label_values(&[outcome.as_str()])
            .inc();
        let result_class = match (&result, status_code) {
            (AttemptResult::RequestInvalid, _) => "not_sent",
            (_, Some(code)) => match code {
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                _ => "5xx",
            },
            (_, None) => "transport_error",
        };
        metrics.attempts.with_label_values(&[result_class]).inc();
        if result != AttemptResult::RequestInvalid {
            metrics
                .attempt_duration
                .with_label_values(&[outcome.as_str()])
                .observe(latency.as_secs_f64());
        }
        let (error_class, error_message) = match error {
            Some((class, message)) => (Some(class), Some(message)),
            None => (None, None),
        };
        let retry_in_ms = match outcome {
            AttemptOutcome::RetryIn(delay) => Some(delay.as_millis() as u64),
            _ => None,
        };
        let fields_event_id = delivery
            .event_id
            .as_deref()
            .unwrap_or(delivery.key.as_str());
        macro_rules! log_attempt {
            ($level:ident, $message:literal) => {
                tracing::$level!(
                    partition = delivery.partition,
                    offset = delivery.offset,
                    event_id = fields_event_id,
                    load_id = %delivery.load_id,
                    broker_id = %self.broker_id,
                    delivery_id = delivery.delivery_id,
                    attempt,
                    status_code,
                    latency_ms = latency.as_millis() as u64,
                    outcome = outcome.as_str(),
                    retry_in_ms,
                    error.class = error_class,
                    error.message = error_message.as_deref(),
                    $message
                )
            };
        }
        match &outcome {
            AttemptOutcome::Delivered => log_attempt!(info, "webhook delivered"),
            AttemptOutcome::RetryIn(_) => log_attempt!(warn, "webhook attempt failed; will retry"),
            AttemptOutcome::Dead { .. } => log_attempt!(warn, "webhook dead-lettered"),
        }
        if verdict == Verdict::DeadAndDisableBroker {
            self.deps.ledger.do_send(DisableBroker {
                broker_id: self.broker_id.clone(),
                reason: format!(
                    "answered 410 Gone at {} (delivery {})",
                    Utc::now().to_rfc3339(),
                    delivery.delivery_id
                ),
            });
            tracing::warn!(broker_id = %self.broker_id, "broker disabled after 410 Gone; its pending deliveries will be dead-lettered");
            self.endpoint = Endpoint::Unknown;
        }
        self.unsaved.push(UnsavedOutcome {
            load_id,
            record: AttemptRecord {
                delivery_id: delivery.delivery_id,
                broker_id: self.broker_id.clone(),
                attempt,
                started_at,
                latency,
                status_code,
                error_class,
                error_message,
                outcome,
            },
        });
        self.save_outcomes(ctx);
    }

    /// Writes decided outcomes in one round trip; the lanes move on only once they are saved,
    /// so a crash can never leave a later event of a load delivered before an earlier one.
    fn save_outcomes(&mut self, ctx: &mut Context<Self>) {
        if self.saving || self.unsaved.is_empty() {
            return;
        }
        self.saving = true;
        let batch = std::mem::take(&mut self.unsaved);
        let records = batch.iter().map(|u| u.record.clone()).collect();
        let save = self.deps.ledger.send(RecordAttempts { records });
        ctx.spawn(save.into_actor(self).map(move |result, act, ctx| {
            act.guarded(ctx, "save_outcomes", move |act, ctx| {
            act.saving = false;
            let error = match result {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(error.to_string()),
                Err(error) => Some(error.to_string()),
            };
            if let Some(error) = error {
                tracing::error!(broker_id = %act.broker_id, error.message = %error, outcomes = batch.len(),
                    "could not save delivery outcomes; retrying in 1 s");
                act.unsaved.splice(0..0, batch);
                ctx.run_later(Duration::from_secs(1), |act, ctx| {
                    act.guarded(ctx, "save_outcomes", Self::save_outcomes)
                });
                return;
            }
            let now = Instant::now();
            for saved in batch {
                act.in_flight -= 1;
                match saved.record.outcome {
                    AttemptOutcome::RetryIn(delay) => {
                        if let Some(head) = act.lanes.head_mut(&saved.load_id) {
                            head.attempts = saved.record.attempt;
                        }
                        act.lanes.finish(&saved.load_id, Finish::RetryAt(now + delay));
                    }
                    _ => act.lanes.finish(&saved.load_id, Finish::Done),
                }
            }
            act.save_outcomes(ctx);
            act.notify_drained_if_idle();
            act.dispatch(ctx);
            });
        }));
    }

    fn load_endpoint(&mut self, ctx: &mut Context<Self>) {
        self.endpoint = Endpoint::Loading;
        let load = self.deps.ledger.send(LoadBroker {
            broker_id: self.broker_id.clone(),
        });
        ctx.spawn(load.into_actor(self).map(|result, act, ctx| {
            act.guarded(ctx, "load_endpoint", move |act, ctx| {
            let endpoint = match result {
                Ok(Ok(row)) => act.usable_endpoint(BrokerEndpoint::from_row(row.as_ref())),
                Ok(Err(error)) => {
                    tracing::warn!(broker_id = %act.broker_id, error.message = %error, "could not load broker; retrying in 1 s");
                    act.endpoint = Endpoint::Unknown;
                    ctx.run_later(Duration::from_secs(1), |act, ctx| {
                        act.guarded(ctx, "dispatch", Self::dispatch)
                    });
                    return;
                }
                Err(_) => return,
            };
            if let Err(unusable) = &endpoint {
                tracing::warn!(broker_id = %act.broker_id, error.class = unusable.class, error.message = %unusable.reason,
                    "broker cannot receive webhooks; its deliveries are dead-lettered until the row is fixed and they are replayed");
            }
            act.endpoint = Endpoint::Loaded {
                endpoint,
                at: Instant::now(),
            };
            act.dispatch(ctx);
            });
        }));
    }

    /// A loaded broker row, checked once: broken rows and URLs the SSRF guard refuses get no
    /// requests.
    fn usable_endpoint(
        &self,
        endpoint: Result<BrokerEndpoint, EndpointError>,
    ) -> Result<BrokerEndpoint, Unusable> {
        let endpoint = endpoint.map_err(|reason| Unusable {
            class: "invalid_broker",
            reason: format!("broker {}: {reason}", self.broker_id),
        })?;
        self.network_policy
            .check_url(&endpoint.url)
            .map_err(|why| Unusable {
                class: "ssrf_refused",
                reason: format!("refused by the SSRF guard: {why}"),
            })?;
        Ok(endpoint)
    }

    /// Some pending deliveries may be in the ledger but not in memory: load them when there is
    /// room (see `load_from_ledger`).
    pub(super) fn want_ledger_load(&mut self) {
        self.ledger_load_wanted += 1;
    }

    /// Loads pending deliveries from the ledger when some may be missing from memory and at
    /// least half the lanes' capacity is free (or they are empty).
    fn load_from_ledger(&mut self, ctx: &mut Context<Self>) {
        let room = self.lanes.room();
        if self.ledger_load_done >= self.ledger_load_wanted
            || self.loading_from_ledger
            || self.is_draining
            || (room < self.deps.settings.mailbox_capacity / 2 && !self.lanes.is_empty())
            || room == 0
        {
            return;
        }
        let partitions = self.deps.leases.held(Instant::now());
        let started_at = self.ledger_load_wanted;
        if partitions.is_empty() {
            // Nothing is ours to send; a lease acquisition asks again.
            self.ledger_load_done = started_at;
            return;
        }
        self.loading_from_ledger = true;
        let load = self.deps.ledger.send(LoadPending {
            broker_id: self.broker_id.clone(),
            partitions,
            exclude: self.lanes.known_ids(),
            limit: room,
        });
        ctx.spawn(load.into_actor(self).map(move |result, act, ctx| {
            act.guarded(ctx, "load_from_ledger", move |act, ctx| {
            act.loading_from_ledger = false;
            let rows = match result {
                Ok(Ok(rows)) => rows,
                Ok(Err(error)) => {
                    tracing::warn!(broker_id = %act.broker_id, error.message = %error, "could not load pending deliveries; the next sweep retries");
                    return;
                }
                Err(_) => return,
            };
            // Fewer rows than asked for: everything pending at the start of this load is held
            // now. Anything wanted since then needs another load.
            if rows.len() < room {
                act.ledger_load_done = started_at;
            }
            let now = Instant::now();
            for row in rows {
                let not_before = (!row.due_in.is_zero()).then(|| now + row.due_in);
                let (id, order) = (row.delivery_id, (row.partition, row.offset));
                let load_id = row.load_id.clone();
                act.lanes.insert(id, &load_id, order, not_before, row);
            }
            act.dispatch(ctx);
            });
        }));
    }

    fn log_transition(&self, transition: &Transition) {
        let open_until_at = transition.open_until.map(|until| {
            let left = until.saturating_duration_since(Instant::now());
            Utc::now() + chrono::Duration::from_std(left).unwrap_or_default()
        });
        let open_until = open_until_at.map(|at| at.to_rfc3339());
        self.deps
            .metrics
            .circuit_state
            .with_label_values(&[self.broker_id.as_str()])
            .set(circuit_state_value(transition.to));
        self.deps.ledger.do_send(RecordCircuit(CircuitRecord {
            broker_id: self.broker_id.clone(),
            state: transition.to,
            since: Utc::now(),
            consecutive_failures: transition.consecutive_failures,
            open_until: open_until_at,
            reason: transition.reason.clone(),
            instance_id: self.deps.instance_id.clone(),
        }));
        tracing::warn!(
            broker_id = %self.broker_id,
            from = transition.from,
            to = transition.to,
            reason = %transition.reason,
            consecutive_failures = transition.consecutive_failures,
            open_until,
            "circuit state changed"
        );
    }

    fn schedule_wakeup(&mut self, ctx: &mut Context<Self>) {
        if let Some(handle) = self.wakeup.take() {
            ctx.cancel_future(handle);
        }
        let breaker_reopens = self.breaker.open_until().filter(|_| !self.lanes.is_empty());
        let next = match (self.lanes.next_wakeup(), breaker_reopens) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(at) = next {
            let delay = at.saturating_duration_since(Instant::now());
            self.wakeup = Some(ctx.run_later(delay, |act, ctx| {
                act.wakeup = None;
                act.guarded(ctx, "dispatch", Self::dispatch);
            }));
        }
    }

    /// Runs one step of delivery code with panics contained: a panic is logged with the broker
    /// and the step, and the actor stops, so its Supervisor restarts it (actix restarts on stop,
    /// not on panic). Nothing is lost: what it held in memory is pending in the ledger.
    pub(super) fn guarded(
        &mut self,
        ctx: &mut Context<Self>,
        step: &'static str,
        work: impl FnOnce(&mut Self, &mut Context<Self>),
    ) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(self, ctx)));
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".to_owned());
            tracing::error!(
                broker_id = %self.broker_id,
                step,
                error.message = %message,
                "delivery actor panicked; restarting it (its deliveries stay pending in the ledger)"
            );
            ctx.stop();
        }
    }

    /// What the admin API shows for this broker from memory.
    pub(super) fn snapshot(&self) -> BrokerSnapshot {
        let since = Utc::now()
            - chrono::Duration::from_std(self.breaker.since().elapsed()).unwrap_or_default();
        let open_until = self.breaker.open_until().map(|until| {
            Utc::now()
                + chrono::Duration::from_std(until.saturating_duration_since(Instant::now()))
                    .unwrap_or_default()
        });
        BrokerSnapshot {
            broker_id: self.broker_id.clone(),
            circuit_state: self.breaker.state().name(),
            circuit_since: since,
            circuit_open_until: open_until,
            consecutive_failures: self.breaker.consecutive_failures(),
            in_flight: self.in_flight,
            in_memory: self.lanes.len(),
        }
    }

    fn notify_drained_if_idle(&mut self) {
        if self.is_draining && self.in_flight == 0 && !self.saving && self.unsaved.is_empty() {
            for waiter in self.draining.drain(..) {
                let _ = waiter.send(());
            }
        }
    }
}

impl Actor for DeliveryActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_MESSAGES);
        tracing::info!(broker_id = %self.broker_id, "delivery actor started");
        self.deps
            .metrics
            .circuit_state
            .with_label_values(&[self.broker_id.as_str()])
            .set(circuit_state_value(self.breaker.state().name()));
        self.guarded(ctx, "dispatch", Self::dispatch);
    }
}

impl actix::Supervised for DeliveryActor {
    /// Forget everything held in memory and start over from the ledger. The breaker's state
    /// and outcomes already decided but not yet saved are kept.
    fn restarting(&mut self, _: &mut Self::Context) {
        tracing::warn!(broker_id = %self.broker_id, "delivery actor restarted; reloading its pending deliveries from the ledger");
        self.deps
            .metrics
            .actor_restarts
            .with_label_values(&["delivery"])
            .inc();
        self.lanes = LoadQueues::new(self.deps.settings.mailbox_capacity);
        self.endpoint = Endpoint::Unknown;
        self.in_flight = self.unsaved.len();
        self.want_ledger_load();
        self.loading_from_ledger = false;
        self.saving = false;
        self.wakeup = None;
    }
}

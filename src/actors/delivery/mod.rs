//! DeliveryActor: one per broker, a thin shell around the broker's pure scheduler
//! ([`crate::core::scheduler::Scheduler`]). Every input (a claim, an answer, a saved outcome,
//! a ledger page, a broker row, a lease change, a timer) goes to the scheduler with the time;
//! the actor then carries out the commands the scheduler queued: make a request, log a
//! decision, write outcomes, read the ledger or the broker row, disable the broker, log a
//! breaker transition, and sets one timer for the scheduler's next wakeup. The decisions (which
//! delivery goes next, per-load order, the breaker, retries, room, replays, restarts) are all in
//! the scheduler and proven by the simulator in tests/simulation.rs.

mod budget;
mod handlers;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorContext, ActorFutureExt, Addr, AsyncContext, Context, SpawnHandle, WrapFuture,
};
use chrono::{DateTime, Utc};
use rand::Rng;

pub use budget::{ByteBudget, Held};
pub use handlers::*;

use crate::actors::delivery_supervisor::{
    ActorIdle, DeliverySupervisor, WantBrokerRow, BROKER_ROW_PUSH,
};
use crate::actors::ledger_gateway::{
    DisableBroker, LedgerGateway, LoadPending, RecordAttempts, RecordCircuit,
};
use crate::broker::BrokerEndpoint;
use crate::config::DeliverySettings;
use crate::connection_budget::{ConnectionBudget, SCARCE_KEEP_ALIVE};
use crate::core::breaker::{BreakerConfig, Transition};
use crate::core::lanes::LaneCensus;
use crate::core::policy::{parse_retry_after, AttemptResult, RetryPolicy};
use crate::core::scheduler::{
    AttemptToken, Command, Decision, Delivery, IoToken, NotMade, Outcome, PartitionCursor,
    Scheduler, SchedulerConfig, Unusable,
};
use crate::core::signing::{signature_header, webhook_id};
use crate::core::Millis;
use crate::lease::LeaseBook;
use crate::ledger::{AttemptOutcome, AttemptRecord, CircuitRecord, PendingDelivery};
use crate::metrics::circuit_state_value;
use crate::webhook_client::{self, WebhookRequest};

/// How long a broker row is trusted before the actor asks for it itself. The supervisor pushes
/// every running actor its row every `BROKER_ROW_PUSH`, so this is only the fallback when
/// pushes fail.
const ENDPOINT_REFRESH: Duration = BROKER_ROW_PUSH.saturating_mul(3);
/// Messages waiting in the actix mailbox; each carries a batch of deliveries.
const MAILBOX_MESSAGES: usize = 64;
/// How often an actor adds its lanes to the instance's `lanes` gauge (a walk over its lanes,
/// so not on every step).
const LANE_CENSUS_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct DeliveryDeps {
    pub ledger: Addr<LedgerGateway>,
    pub leases: LeaseBook,
    pub settings: DeliverySettings,
    pub retry: RetryPolicy,
    pub breaker: BreakerConfig,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    pub instance_id: String,
    /// Ledger page reads under way at once, all actors together
    /// (`delivery.max_concurrent_ledger_loads`): a lease gain or 10,000 actors starting queue
    /// at most this many reads on the pool; the rest wait here, not for a connection.
    pub ledger_loads: std::sync::Arc<tokio::sync::Semaphore>,
    /// Bytes of deliveries held in memory, all actors together (`delivery.max_buffered_bytes`).
    pub buffered: std::sync::Arc<ByteBudget>,
    /// Webhook sockets open, all actors together (`delivery.max_outbound_connections`).
    pub connections: std::sync::Arc<ConnectionBudget>,
}

/// The shell's clock for the scheduler: milliseconds since the process first asked.
pub fn millis(at: Instant) -> Millis {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    Millis(u64::try_from(at.saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX))
}

/// The wall-clock time of a scheduler instant, for logs and the admin API.
fn wall_clock(at: Millis) -> DateTime<Utc> {
    let now = millis(Instant::now());
    let offset = |d: Duration| chrono::Duration::from_std(d).unwrap_or_default();
    if at <= now {
        Utc::now() - offset(now.since(at))
    } else {
        Utc::now() + offset(at.since(now))
    }
}

/// A broker's live state on this instance (admin API `GET /brokers`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BrokerSnapshot {
    pub broker_id: String,
    pub circuit_state: &'static str,
    pub circuit_since: DateTime<Utc>,
    pub circuit_open_until: Option<DateTime<Utc>>,
    pub consecutive_failures: u32,
    pub in_flight: usize,
    /// Requests allowed at once now (adaptive, up to `max_in_flight_per_broker`).
    pub in_flight_limit: usize,
    pub in_memory: usize,
    pub lanes: LaneCensus,
}

/// What one request produced, in the terms the log line and the ledger need.
#[derive(Debug, Clone)]
pub struct AttemptReport {
    started_at: DateTime<Utc>,
    latency: Duration,
    result: AttemptResult,
    status_code: Option<u16>,
    /// (error class, message) for anything but a 2xx.
    error: Option<(&'static str, String)>,
}

impl AttemptReport {
    fn from_response(
        response: Result<webhook_client::WebhookResponse, webhook_client::SendError>,
        started_at: DateTime<Utc>,
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
            // The SSRF guard refused the resolved address: permanent, like a bad URL, and no
            // request reached the broker.
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
}

pub struct DeliveryActor {
    broker_id: String,
    deps: DeliveryDeps,
    /// Reads broker rows for all actors in one statement (`WantBrokerRow`).
    supervisor: Addr<DeliverySupervisor>,
    /// The supervisor's id for this actor, named in `ActorIdle`.
    actor_id: u64,
    /// Built on the first request, dropped (its idle sockets closed, their budget given back)
    /// once nothing has been in flight for `delivery.connection_keep_alive_ms`.
    client: Option<awc::Client>,
    release_timer: Option<SpawnHandle>,
    /// Since when nothing has been in flight.
    connections_idle_since: Option<Instant>,
    network_policy: std::sync::Arc<crate::core::ssrf::NetworkPolicy>,
    scheduler: Scheduler<Held, AttemptReport>,
    /// The broker's endpoint as last read, when usable (the scheduler knows whether it is).
    endpoint: Option<BrokerEndpoint>,
    /// Why the row last read was unusable, so the warning is logged once per change, not on
    /// every refresh.
    unusable: Option<Unusable>,
    draining: Vec<tokio::sync::oneshot::Sender<()>>,
    wakeup: Option<SpawnHandle>,
    /// Messages received from the supervisor that change state; it retires an idle actor only
    /// when it has sent no more than this (nothing it does not know of is in the mailbox).
    received: u64,
    /// Since when the scheduler has been idle, and the timer that reports it after
    /// `delivery.idle_actor_ms`.
    idle_since: Option<Instant>,
    idle_timer: Option<SpawnHandle>,
    /// Retired by the supervisor: it stops, and if actix restarts it anyway (a strong address
    /// still alive) it does nothing: another actor may own the broker by then.
    retired: bool,
    /// This actor's share of the `lanes` gauge as last added: the next sample adds the
    /// difference, retiring takes it back.
    lanes_reported: LaneCensus,
}

impl DeliveryActor {
    pub fn new(
        broker_id: String,
        deps: DeliveryDeps,
        supervisor: Addr<DeliverySupervisor>,
        actor_id: u64,
    ) -> Self {
        let network_policy = std::sync::Arc::new(deps.settings.network_policy());
        let config = SchedulerConfig {
            capacity: deps.settings.mailbox_capacity,
            max_in_flight: deps.settings.max_in_flight_per_broker,
            adaptive_in_flight: deps.settings.adaptive_in_flight,
            request_timeout: deps.settings.request_timeout(),
            endpoint_refresh: ENDPOINT_REFRESH,
            retry: deps.retry,
            breaker: deps.breaker,
        };
        let now = Instant::now();
        let mut scheduler = Scheduler::new(config, millis(now));
        // Leases taken before this actor existed.
        for (partition, generation) in deps.leases.held_generations(now) {
            scheduler.lease_gained(millis(now), partition, generation);
        }
        DeliveryActor {
            network_policy,
            broker_id,
            deps,
            supervisor,
            actor_id,
            client: None,
            release_timer: None,
            connections_idle_since: None,
            scheduler,
            endpoint: None,
            unusable: None,
            draining: Vec::new(),
            wakeup: None,
            received: 0,
            idle_since: None,
            idle_timer: None,
            retired: false,
            lanes_reported: LaneCensus::default(),
        }
    }

    /// Feeds one input to the scheduler (with the time) and carries out what it asks for.
    fn step(
        &mut self,
        ctx: &mut Context<Self>,
        input: impl FnOnce(&mut Scheduler<Held, AttemptReport>, Millis),
    ) {
        input(&mut self.scheduler, millis(Instant::now()));
        self.execute(ctx);
    }

    fn execute(&mut self, ctx: &mut Context<Self>) {
        while let Some(command) = self.scheduler.poll_command() {
            match command {
                Command::Send {
                    token,
                    item,
                    attempt,
                    ..
                } => self.send(ctx, token, item.row, attempt),
                Command::Decided { outcome, item } => self.log_decision(&outcome, &item.row),
                Command::WriteOutcomes { token, outcomes } => {
                    self.write_outcomes(ctx, token, outcomes)
                }
                Command::LoadPending {
                    token,
                    cursors,
                    per_partition,
                } => self.load_pending(ctx, token, cursors, per_partition),
                Command::LoadBroker => self.supervisor.do_send(WantBrokerRow {
                    broker_id: self.broker_id.clone(),
                }),
                Command::DisableBroker { delivery_id } => self.disable_broker(delivery_id),
                Command::BreakerChanged(transition) => self.log_transition(&transition),
            }
        }
        self.schedule_wakeup(ctx);
        self.watch_idle(ctx);
        self.watch_connections(ctx);
        self.update_gauges();
        if self.scheduler.is_drained() {
            for waiter in self.draining.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    /// Makes one request, unless the partition's lease no longer covers it.
    fn send(
        &mut self,
        ctx: &mut Context<Self>,
        token: AttemptToken,
        delivery: PendingDelivery,
        attempt: u32,
    ) {
        let request_timeout = self.deps.settings.request_timeout();
        let lease_covers =
            self.deps
                .leases
                .may_send(delivery.partition, Instant::now(), request_timeout);
        let Some(endpoint) = self.endpoint.clone().filter(|_| lease_covers) else {
            // Not ours to send (any more), or the row vanished from under us: it stays pending.
            let now = millis(Instant::now());
            self.scheduler
                .attempt_not_made(now, token, NotMade::LeaseLapsed);
            return;
        };
        #[cfg(feature = "fault-injection")]
        crate::fault_injection::maybe_panic_in_delivery(&self.broker_id);
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
        tracing::debug!(broker_id = %self.broker_id, delivery_id = delivery.delivery_id,
            load_id = %delivery.load_id, attempt, "sending webhook");
        let client = self.client();
        let max_response_bytes = self.deps.settings.max_response_bytes;
        let call = async move {
            webhook_client::send(&client, &request, request_timeout, max_response_bytes).await
        };
        // Spawned in the actor's context: a restart cancels it (the scheduler forgets it too).
        ctx.spawn(
            call.into_actor(self)
                .map(move |(result, latency), act, ctx| {
                    act.guarded(ctx, "attempt_finished", move |act, ctx| {
                        if let Err(webhook_client::SendError::LocalShortage(error)) = &result {
                            act.deps.connections.note_shortage(&act.broker_id, error);
                            act.step(ctx, |s, now| {
                                s.attempt_not_made(now, token, NotMade::LocalShortage)
                            });
                            return;
                        }
                        let report = AttemptReport::from_response(result, started_at, latency);
                        let jitter = rand::rng().random::<f64>();
                        act.step(ctx, |s, now| {
                            s.attempt_finished(now, token, report.result.clone(), jitter, report)
                        });
                    });
                }),
        );
    }

    /// One log line and the metrics for a decided attempt.
    fn log_decision(&self, outcome: &Outcome<AttemptReport>, delivery: &PendingDelivery) {
        let metrics = &self.deps.metrics;
        let ledger_outcome = ledger_outcome(outcome);
        metrics
            .deliveries
            .with_label_values(&[ledger_outcome.as_str()])
            .inc();
        let report = outcome.report.as_ref();
        let status_code = report.and_then(|r| r.status_code);
        let result_class = match (report.map(|r| &r.result), status_code) {
            (None | Some(AttemptResult::RequestInvalid), _) => "not_sent",
            (_, Some(200..=299)) => "2xx",
            (_, Some(300..=399)) => "3xx",
            (_, Some(400..=499)) => "4xx",
            (_, Some(_)) => "5xx",
            (_, None) => "transport_error",
        };
        metrics.attempts.with_label_values(&[result_class]).inc();
        let latency = report.map_or(Duration::ZERO, |r| r.latency);
        if result_class != "not_sent" {
            metrics
                .attempt_duration
                .with_label_values(&[ledger_outcome.as_str()])
                .observe(latency.as_secs_f64());
        }
        let (error_class, error_message) = error_of(outcome);
        let retry_in_ms = match outcome.decision {
            Decision::RetryIn(delay) => Some(delay.as_millis() as u64),
            _ => None,
        };
        let event_id = delivery
            .event_id
            .as_deref()
            .unwrap_or(delivery.key.as_str());
        macro_rules! log_attempt {
            ($level:ident, $message:literal) => {
                tracing::$level!(
                    partition = delivery.partition,
                    offset = delivery.offset,
                    event_id,
                    load_id = %delivery.load_id,
                    broker_id = %self.broker_id,
                    delivery_id = delivery.delivery_id,
                    attempt = outcome.attempt,
                    status_code,
                    latency_ms = latency.as_millis() as u64,
                    outcome = ledger_outcome.as_str(),
                    retry_in_ms,
                    error.class = error_class,
                    error.message = error_message.as_deref(),
                    $message
                )
            };
        }
        match &outcome.decision {
            Decision::Delivered => log_attempt!(info, "webhook delivered"),
            Decision::RetryIn(_) => log_attempt!(warn, "webhook attempt failed; will retry"),
            Decision::Dead { .. } => log_attempt!(warn, "webhook dead-lettered"),
        }
    }

    /// Writes decided outcomes in one round trip. The answer comes back as a message, so it
    /// reaches the scheduler even if the actor restarts meanwhile (the write itself goes on in
    /// the ledger actor either way).
    fn write_outcomes(
        &mut self,
        ctx: &mut Context<Self>,
        token: IoToken,
        outcomes: Vec<Outcome<AttemptReport>>,
    ) {
        let records = outcomes
            .iter()
            .map(|outcome| {
                let (error_class, error_message) = error_of(outcome);
                let report = outcome.report.as_ref();
                AttemptRecord {
                    delivery_id: outcome.delivery_id,
                    broker_id: self.broker_id.clone(),
                    attempt: outcome.attempt,
                    started_at: report
                        .map_or_else(|| wall_clock(outcome.decided_at), |r| r.started_at),
                    latency: report.map_or(Duration::ZERO, |r| r.latency),
                    status_code: report.and_then(|r| r.status_code),
                    error_class,
                    error_message,
                    outcome: ledger_outcome(outcome),
                }
            })
            .collect();
        let save = self.deps.ledger.send(RecordAttempts { records });
        let me = ctx.address();
        let (broker_id, count) = (self.broker_id.clone(), outcomes.len());
        actix::spawn(async move {
            let saved = match save.await {
                Ok(Ok(())) => true,
                Ok(Err(error)) => {
                    tracing::error!(broker_id = %broker_id, error.message = %error, outcomes = count,
                        "could not save delivery outcomes; retrying in 1 s");
                    false
                }
                Err(error) => {
                    tracing::error!(broker_id = %broker_id, error.message = %error, outcomes = count,
                        "could not save delivery outcomes; retrying in 1 s");
                    false
                }
            };
            me.do_send(OutcomesWritten { token, saved });
        });
    }

    fn load_pending(
        &mut self,
        ctx: &mut Context<Self>,
        token: IoToken,
        cursors: Vec<PartitionCursor>,
        per_partition: usize,
    ) {
        if !self.deps.buffered.has_room() {
            // Memory is full (all brokers together): read nothing now; the scheduler tries
            // again after its pause.
            tracing::debug!(broker_id = %self.broker_id,
                "delivery.max_buffered_bytes reached; ledger read postponed");
            self.scheduler.load_failed(millis(Instant::now()), token);
            return;
        }
        let (ledger, permits) = (self.deps.ledger.clone(), self.deps.ledger_loads.clone());
        let request = LoadPending {
            broker_id: self.broker_id.clone(),
            cursors,
            per_partition,
        };
        // The permit is held until the answer is in; a restart drops the future, and the
        // permit with it.
        let load = async move {
            let _permit = permits.acquire_owned().await;
            ledger.send(request).await
        };
        ctx.spawn(load.into_actor(self).map(move |result, act, ctx| {
            act.guarded(ctx, "load_pending", move |act, ctx| match result {
                Ok(Ok(rows)) => {
                    let metrics = &act.deps.metrics;
                    metrics.ledger_pages.inc();
                    metrics.ledger_page_rows.inc_by(rows.len() as u64);
                    let (held, left) = act.admit(rows);
                    act.step(ctx, |s, now| {
                        if held.is_empty() && left {
                            // Not one row fits in memory: as if the read failed (it is tried
                            // again after a pause, not at once).
                            s.load_failed(now, token);
                        } else {
                            // What fits is taken in; the rest is read once room frees up.
                            s.loaded(now, token, held);
                            if left {
                                s.ledger_has_more(now);
                            }
                        }
                    });
                }
                Ok(Err(error)) => {
                    tracing::warn!(broker_id = %act.broker_id, error.message = %error,
                        "could not load pending deliveries; the next sweep retries");
                    act.step(ctx, |s, now| s.load_failed(now, token));
                }
                Err(_) => act.step(ctx, |s, now| s.load_failed(now, token)),
            });
        }));
    }

    /// A broker row the supervisor read (asked for or its periodic push), or why it could not.
    fn broker_row_read(&mut self, ctx: &mut Context<Self>, read: BrokerRowRead) {
        let read_at = millis(read.read_at);
        match read.row {
            Ok(row) => {
                let usable = self.usable_endpoint(row.as_ref());
                match &usable {
                    Err(unusable) if self.unusable.as_ref() != Some(unusable) => {
                        tracing::warn!(broker_id = %self.broker_id, error.class = unusable.class,
                            error.message = %unusable.reason,
                            "broker cannot receive webhooks; its deliveries are dead-lettered until the row is fixed and they are replayed");
                    }
                    _ => {}
                }
                self.unusable = usable.as_ref().err().cloned();
                self.endpoint = usable.as_ref().ok().cloned();
                self.step(ctx, |s, now| {
                    s.broker_loaded(now, read_at, usable.map(|_| ()))
                });
            }
            // The supervisor logged it, once for all brokers of the read.
            Err(_) => self.step(ctx, |s, now| s.broker_load_failed(now)),
        }
    }

    /// Charges the budget for `rows` in order and stops at the first that does not fit (the
    /// rest stay in the ledger; a lane is a prefix). True in the second place if some were left.
    pub(super) fn admit(&self, rows: Vec<PendingDelivery>) -> (Vec<Delivery<Held>>, bool) {
        let total = rows.len();
        let held: Vec<_> = rows
            .into_iter()
            .map_while(|row| self.deps.buffered.charge(row))
            .map(scheduled)
            .collect();
        let left = held.len() < total;
        (held, left)
    }

    /// A broker row, checked once per read: broken rows, disabled brokers and URLs the SSRF
    /// guard refuses get no requests.
    fn usable_endpoint(
        &self,
        row: Option<&crate::ledger::BrokerRow>,
    ) -> Result<BrokerEndpoint, Unusable> {
        let endpoint = BrokerEndpoint::from_row(row).map_err(|reason| Unusable {
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

    fn disable_broker(&mut self, delivery_id: i64) {
        self.endpoint = None;
        self.deps.ledger.do_send(DisableBroker {
            broker_id: self.broker_id.clone(),
            reason: format!(
                "answered 410 Gone at {} (delivery {delivery_id})",
                Utc::now().to_rfc3339()
            ),
        });
        tracing::warn!(broker_id = %self.broker_id, delivery_id,
            "broker disabled after 410 Gone; its pending deliveries will be dead-lettered");
    }

    fn log_transition(&self, transition: &Transition) {
        let open_until_at = transition.open_until.map(wall_clock);
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
        let now = millis(Instant::now());
        if let Some(at) = self.scheduler.next_wakeup(now) {
            self.wakeup = Some(ctx.run_later(at.since(now), |act, ctx| {
                act.wakeup = None;
                act.guarded(ctx, "tick", |act, ctx| act.step(ctx, |s, now| s.tick(now)));
            }));
        }
    }

    /// This broker's HTTP client, built if the last one was let go.
    fn client(&mut self) -> awc::Client {
        let settings = &self.deps.settings;
        self.client
            .get_or_insert_with(|| {
                webhook_client::build_client(webhook_client::ClientSettings {
                    user_agent: &settings.user_agent,
                    timeout: settings.request_timeout(),
                    max_connections: settings.max_in_flight_per_broker,
                    keep_alive: settings.connection_keep_alive(),
                    policy: self.network_policy.clone(),
                    budget: self.deps.connections.clone(),
                })
            })
            .clone()
    }

    /// Lets the client go once nothing has been in flight for the keep-alive (a second while the
    /// budget is scarce): its pooled sockets are closed only when it is dropped, and until then
    /// they hold their share of the process's connection budget (a broker with only retries
    /// waiting would hold them for hours). One timer at a time, re-armed when it fires, so a
    /// busy broker does not set and cancel one per request.
    fn watch_connections(&mut self, ctx: &mut Context<Self>) {
        if self.scheduler.in_flight() > 0 {
            self.connections_idle_since = None;
        } else if self.connections_idle_since.is_none() {
            self.connections_idle_since = Some(Instant::now());
        }
        if self.client.is_none() || self.release_timer.is_some() {
            return;
        }
        let keep_alive = self.keep_alive();
        let wait = match self.connections_idle_since {
            Some(since) => keep_alive.saturating_sub(since.elapsed()),
            None => keep_alive,
        };
        self.release_timer = Some(ctx.run_later(wait, |act, ctx| {
            act.release_timer = None;
            let keep_alive = act.keep_alive();
            if act
                .connections_idle_since
                .is_some_and(|since| since.elapsed() >= keep_alive)
            {
                act.client = None;
            } else {
                act.watch_connections(ctx);
            }
        }));
    }

    /// `delivery.connection_keep_alive_ms`, or a second while the connection budget is scarce.
    fn keep_alive(&self) -> Duration {
        let configured = self.deps.settings.connection_keep_alive();
        if self.deps.connections.is_scarce() {
            configured.min(SCARCE_KEEP_ALIVE)
        } else {
            configured
        }
    }

    /// Starts the idle timer when the scheduler becomes idle, cancels it when it is not. When
    /// it fires the supervisor is told; it retires the actor or, if a message is on its way,
    /// ignores the notice (the next message re-arms the timer, which fires at once).
    fn watch_idle(&mut self, ctx: &mut Context<Self>) {
        if !self.scheduler.is_idle() {
            self.idle_since = None;
            if let Some(timer) = self.idle_timer.take() {
                ctx.cancel_future(timer);
            }
            return;
        }
        let since = *self.idle_since.get_or_insert_with(Instant::now);
        if self.idle_timer.is_none() {
            let wait = self
                .deps
                .settings
                .idle_actor()
                .saturating_sub(since.elapsed());
            self.idle_timer = Some(ctx.run_later(wait, move |act, _| {
                act.idle_timer = None;
                act.supervisor.do_send(ActorIdle {
                    broker_id: act.broker_id.clone(),
                    actor_id: act.actor_id,
                    received: act.received,
                    idle_for: since.elapsed(),
                });
            }));
        }
    }

    /// Retired: stop, and do nothing more even if restarted.
    pub(super) fn retire(&mut self, ctx: &mut Context<Self>) {
        self.retired = true;
        for timer in [
            self.wakeup.take(),
            self.idle_timer.take(),
            self.release_timer.take(),
        ]
        .into_iter()
        .flatten()
        {
            ctx.cancel_future(timer);
        }
        self.report_lanes(LaneCensus::default());
        ctx.stop();
    }

    /// Moves the instance's `lanes` gauge by the change since this actor's last sample.
    fn report_lanes(&mut self, census: LaneCensus) {
        let counts = census
            .counts()
            .into_iter()
            .zip(self.lanes_reported.counts());
        for (state, (now, before)) in LaneCensus::STATES.into_iter().zip(counts) {
            if now != before {
                self.deps
                    .metrics
                    .lanes
                    .with_label_values(&[state])
                    .add(now as i64 - before as i64);
            }
        }
        self.lanes_reported = census;
    }

    fn update_gauges(&self) {
        let metrics = &self.deps.metrics;
        let broker = [self.broker_id.as_str()];
        metrics
            .mailbox_depth
            .with_label_values(&broker)
            .set(self.scheduler.held() as i64);
        metrics
            .in_flight
            .with_label_values(&broker)
            .set(self.scheduler.in_flight() as i64);
        metrics
            .in_flight_limit
            .with_label_values(&broker)
            .set(self.scheduler.in_flight_limit() as i64);
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
        if self.retired {
            return;
        }
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
        let breaker = self.scheduler.breaker();
        BrokerSnapshot {
            broker_id: self.broker_id.clone(),
            circuit_state: breaker.state().name(),
            circuit_since: wall_clock(breaker.since()),
            circuit_open_until: breaker.open_until().map(wall_clock),
            consecutive_failures: breaker.consecutive_failures(),
            in_flight: self.scheduler.in_flight(),
            in_flight_limit: self.scheduler.in_flight_limit(),
            in_memory: self.scheduler.held(),
            lanes: self.scheduler.lanes().census(millis(Instant::now())),
        }
    }
}

/// The outcome as the ledger stores it. A request that failed permanently without an answer
/// (the SSRF guard refused the address at connect time) is dead for the reason it failed.
fn ledger_outcome(outcome: &Outcome<AttemptReport>) -> AttemptOutcome {
    match &outcome.decision {
        Decision::Delivered => AttemptOutcome::Delivered,
        Decision::RetryIn(delay) => AttemptOutcome::RetryIn(*delay),
        Decision::Dead { reason } => {
            let unanswered = outcome.report.as_ref().and_then(|r| match r {
                AttemptReport {
                    status_code: None,
                    result: AttemptResult::RequestInvalid,
                    error: Some((_, message)),
                    ..
                } => Some(message.clone()),
                _ => None,
            });
            AttemptOutcome::Dead {
                reason: unanswered.unwrap_or_else(|| reason.clone()),
            }
        }
    }
}

/// The error class and message of an attempt: the request's, or why none was made.
fn error_of(outcome: &Outcome<AttemptReport>) -> (Option<&'static str>, Option<String>) {
    match (&outcome.report, &outcome.not_sent) {
        (Some(report), _) => match &report.error {
            Some((class, message)) => (Some(*class), Some(message.clone())),
            None => (None, None),
        },
        (None, Some(unusable)) => (Some(unusable.class), Some(unusable.reason.clone())),
        (None, None) => match &outcome.decision {
            Decision::Dead { reason } => (Some("attempts_exhausted"), Some(reason.clone())),
            _ => (None, None),
        },
    }
}

impl Actor for DeliveryActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if self.retired {
            return;
        }
        ctx.set_mailbox_capacity(MAILBOX_MESSAGES);
        tracing::info!(broker_id = %self.broker_id, "delivery actor started");
        self.deps
            .metrics
            .circuit_state
            .with_label_values(&[self.broker_id.as_str()])
            .set(circuit_state_value(self.scheduler.breaker().state().name()));
        self.guarded(ctx, "start", |act, ctx| act.step(ctx, |s, now| s.tick(now)));
        ctx.run_interval(LANE_CENSUS_EVERY, |act, _| {
            let census = act.scheduler.lanes().census(millis(Instant::now()));
            act.report_lanes(census);
        });
    }
}

impl actix::Supervised for DeliveryActor {
    /// Requests in flight were cancelled with the old context; the scheduler forgets them,
    /// keeps the outcomes decided but not yet saved, and reads everything else again from the
    /// ledger. The breaker's state is kept.
    fn restarting(&mut self, _: &mut Self::Context) {
        if self.retired {
            return;
        }
        tracing::warn!(broker_id = %self.broker_id, "delivery actor restarted; reloading its pending deliveries from the ledger");
        self.deps
            .metrics
            .actor_restarts
            .with_label_values(&["delivery"])
            .inc();
        self.endpoint = None;
        self.wakeup = None;
        self.idle_since = None;
        self.idle_timer = None;
        self.release_timer = None;
        self.scheduler.restarted(millis(Instant::now()));
    }
}

/// A ledger row as the scheduler sees it (the row itself, with its charge on the memory
/// budget, travels along as the item to send).
pub(super) fn scheduled(held: Held) -> Delivery<Held> {
    let row = &held.row;
    Delivery {
        id: row.delivery_id,
        load: row.load_id.clone(),
        partition: row.partition,
        offset: row.offset,
        attempts: row.attempts,
        due_in: row.due_in,
        item: held,
    }
}

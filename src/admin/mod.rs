//! The admin HTTP API (actix-web), for on-call and for Prometheus. It reads through the ledger
//! and asks the actors; it never reaches around them.
//!
//! | route                         | what                                                    |
//! |-------------------------------|---------------------------------------------------------|
//! | `GET /healthz`                | the process is alive                                    |
//! | `GET /readyz`                 | Postgres answers, the consumer is a settled group member, nothing stalled (else the reason) |
//! | `GET /metrics`                | Prometheus text                                         |
//! | `GET /brokers`                | per broker: circuit, in flight, pending, dead, last error |
//! | `GET /dead-letters`           | like `dead-letters list` (`?broker=&since=&limit=`)     |
//! | `POST /dead-letters/replay`   | like `dead-letters replay`; needs `Authorization: Bearer` |
//! | `POST /brokers/{id}/backfill` | like `backfill` (`{"since", "until"?, "load"?, "dry_run"?}`); needs the bearer token |
//!
//! `/brokers` and `/dead-letters` show event ids, load ids and broker response bodies: when
//! `admin.token` is set they need the bearer token too. The probes and `/metrics` stay open.
//! Bad query parameters get a 400 with a JSON `error`; database errors are logged and answered
//! with a generic message, never echoed.

mod routes;

use std::net::TcpListener;
use std::sync::Arc;

use actix::Addr;
use actix_web::{web, App, HttpServer};

use crate::actors::delivery_supervisor::DeliverySupervisor;
use crate::ledger::Ledger;
use crate::metrics::Metrics;

/// How long Postgres may take to answer before `/readyz` (and the `ready` gauge) says not ready.
pub const READY_DATABASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// What `/readyz` and `/healthz` report: whether the consumer is a settled member of its group
/// (and if not, why), and whether something broke that only a restart mends (then both answer 503
/// and Kubernetes restarts the pod; nothing is lost, the ledger and the committed offsets carry
/// over).
#[derive(Clone)]
pub struct Health {
    /// `None` once joined; otherwise why not (starting, rebalancing, a failed rebalance, a first
    /// deployment waiting for its starting offsets).
    not_joined: Arc<std::sync::Mutex<Option<String>>>,
    broken: Arc<std::sync::Mutex<Option<String>>>,
    /// Stalled partitions and outcome writers (src/stall.rs), by what stalled.
    stalled: Arc<std::sync::Mutex<std::collections::BTreeMap<String, String>>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            not_joined: Arc::new(std::sync::Mutex::new(Some(
                "the Kafka consumer has not joined its group yet".to_owned(),
            ))),
            broken: Arc::default(),
            stalled: Arc::default(),
        }
    }
}

impl Health {
    pub fn mark_joined(&self) {
        *lock(&self.not_joined) = None;
    }
    /// Not ready until the next `mark_joined`: a rebalance in progress or failed, or no
    /// consuming at all yet.
    pub fn mark_not_joined(&self, reason: String) {
        *lock(&self.not_joined) = Some(reason);
    }
    pub fn not_joined_reason(&self) -> Option<String> {
        lock(&self.not_joined).clone()
    }
    pub fn mark_broken(&self, reason: String) {
        lock(&self.broken).get_or_insert(reason);
    }
    pub fn broken(&self) -> Option<String> {
        lock(&self.broken).clone()
    }
    /// Why `/readyz` answers 503, apart from the database: broken, not a settled group member,
    /// or stalled. The `ready` gauge asks the same.
    pub fn not_ready_reason(&self) -> Option<String> {
        self.broken()
            .or_else(|| self.not_joined_reason())
            .or_else(|| self.stalled())
    }
    /// `what` (e.g. "partition 3") is stalled: `/readyz` answers 503 with `reason` until cleared.
    pub fn mark_stalled(&self, what: String, reason: String) {
        self.stalls().insert(what, reason);
    }
    pub fn clear_stalled(&self, what: &str) {
        self.stalls().remove(what);
    }
    /// Every current stall, one per line; `None` when nothing is stalled.
    pub fn stalled(&self) -> Option<String> {
        let stalls = self.stalls();
        (!stalls.is_empty()).then(|| {
            stalls
                .iter()
                .map(|(what, reason)| format!("{what} stalled: {reason}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
    fn stalls(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, String>> {
        self.stalled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A poisoned lock only means another thread panicked mid-update of a plain value: use it.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Clone)]
pub struct AdminState {
    pub ledger: Ledger,
    pub deliveries: Addr<DeliverySupervisor>,
    pub metrics: Arc<Metrics>,
    pub health: Health,
    /// None: mutating routes are off and the read routes are open. Some: every route but the
    /// probes and `/metrics` needs it.
    pub token: Option<String>,
}

pub fn serve(listener: TcpListener, state: AdminState) -> std::io::Result<actix_web::dev::Server> {
    let state = web::Data::new(state);
    Ok(HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/healthz", web::get().to(routes::healthz))
            .route("/readyz", web::get().to(routes::readyz))
            .route("/metrics", web::get().to(routes::metrics))
            .route("/brokers", web::get().to(routes::brokers))
            .route("/dead-letters", web::get().to(routes::dead_letters))
            .route("/dead-letters/replay", web::post().to(routes::replay))
            .route(
                "/brokers/{broker_id}/backfill",
                web::post().to(routes::backfill),
            )
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run())
}

#[cfg(test)]
mod tests {
    use super::Health;

    #[test]
    fn readiness_follows_the_group_membership_through_rebalances() {
        let health = Health::default();
        assert!(
            health.not_joined_reason().is_some(),
            "not ready before joining"
        );
        health.mark_joined();
        assert_eq!(health.not_joined_reason(), None);
        health.mark_not_joined("a consumer group rebalance is in progress".to_owned());
        assert_eq!(
            health.not_joined_reason().as_deref(),
            Some("a consumer group rebalance is in progress")
        );
        health.mark_joined();
        assert_eq!(health.not_joined_reason(), None);
    }
}

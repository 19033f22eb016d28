//! The admin HTTP API (actix-web), for on-call and for Prometheus. It reads through the ledger
//! and asks the actors; it never reaches around them.
//!
//! | route                         | what                                                    |
//! |-------------------------------|---------------------------------------------------------|
//! | `GET /healthz`                | the process is alive                                    |
//! | `GET /readyz`                 | Postgres answers, the consumer has joined, nothing stalled |
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix::Addr;
use actix_web::{web, App, HttpServer};

use crate::actors::delivery_supervisor::DeliverySupervisor;
use crate::ledger::Ledger;
use crate::metrics::Metrics;

/// How long Postgres may take to answer before `/readyz` (and the `ready` gauge) says not ready.
pub const READY_DATABASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// What `/readyz` and `/healthz` report: whether the consumer has joined its group, and whether
/// something broke that only a restart mends (then both answer 503 and Kubernetes restarts the
/// pod; nothing is lost, the ledger and the committed offsets carry over).
#[derive(Clone, Default)]
pub struct Health {
    joined: Arc<AtomicBool>,
    broken: Arc<std::sync::Mutex<Option<String>>>,
    /// Stalled partitions and outcome writers (src/stall.rs), by what stalled.
    stalled: Arc<std::sync::Mutex<std::collections::BTreeMap<String, String>>>,
}

impl Health {
    pub fn mark_joined(&self) {
        self.joined.store(true, Ordering::SeqCst);
    }
    pub fn joined(&self) -> bool {
        self.joined.load(Ordering::SeqCst)
    }
    pub fn mark_broken(&self, reason: String) {
        let mut broken = self
            .broken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        broken.get_or_insert(reason);
    }
    pub fn broken(&self) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
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

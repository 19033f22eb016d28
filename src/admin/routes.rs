use std::collections::HashMap;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;

use super::AdminState;
use crate::actors::delivery::BrokerSnapshot;
use crate::actors::delivery_supervisor::BrokerSnapshots;
use crate::ledger::{BackfillOutcome, BackfillRequest, LedgerError, ReplayOutcome, ReplaySelector};

pub async fn healthz(state: web::Data<AdminState>) -> HttpResponse {
    match state.health.broken() {
        None => HttpResponse::Ok().json(json!({"status": "ok"})),
        Some(reason) => {
            HttpResponse::ServiceUnavailable().json(json!({"status": "broken", "reason": reason}))
        }
    }
}

pub async fn readyz(state: web::Data<AdminState>) -> HttpResponse {
    let database = tokio::time::timeout(super::READY_DATABASE_TIMEOUT, state.ledger.ping()).await;
    if let Some(reason) = state.health.broken() {
        return HttpResponse::ServiceUnavailable()
            .json(json!({"status": "not ready", "reason": reason}));
    }
    let reason = match database {
        Err(_) => Some(format!(
            "postgres did not answer within {} s",
            super::READY_DATABASE_TIMEOUT.as_secs()
        )),
        Ok(Err(error)) => Some(format!("postgres: {error}")),
        Ok(Ok(())) => state.health.not_ready_reason(),
    };
    match reason {
        None => HttpResponse::Ok().json(json!({"status": "ready"})),
        Some(reason) => HttpResponse::ServiceUnavailable()
            .json(json!({"status": "not ready", "reason": reason})),
    }
}

pub async fn metrics(state: web::Data<AdminState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

pub async fn brokers(state: web::Data<AdminState>, request: HttpRequest) -> HttpResponse {
    if let Some(refusal) = authorize_read(&state, &request) {
        return refusal;
    }
    let live = state
        .deliveries
        .send(BrokerSnapshots)
        .await
        .unwrap_or_default();
    let stored = match state.ledger.broker_statuses().await {
        Ok(rows) => rows,
        Err(error) => return server_error(error),
    };
    // By id: with thousands of brokers a scan per row would cost seconds.
    let live: HashMap<&str, &BrokerSnapshot> =
        live.iter().map(|s| (s.broker_id.as_str(), s)).collect();
    let brokers: Vec<_> = stored
        .into_iter()
        .map(|row| {
            // This instance's own breaker when it has one, else the last recorded transition
            // (a broker without a running actor here: none yet, or it retired while idle).
            let here = live.get(row.broker_id.as_str()).copied();
            json!({
                "broker_id": row.broker_id,
                "enabled": row.enabled,
                "disabled_reason": row.disabled_reason,
                "circuit_state": here.map_or(row.circuit_state.as_str(), |s| s.circuit_state),
                "circuit_since": here.map(|s| s.circuit_since).or(row.circuit_since),
                "circuit_open_until": here.and_then(|s| s.circuit_open_until).or(row.circuit_open_until),
                "consecutive_failures": here
                    .map(|s| i64::from(s.consecutive_failures))
                    .or(row.circuit_consecutive_failures.map(i64::from))
                    .unwrap_or(0),
                "in_flight": here.map_or(0, |s| s.in_flight),
                "in_flight_limit": here.map(|s| s.in_flight_limit),
                "in_memory": here.map_or(0, |s| s.in_memory),
                "lanes": here.map(|s| s.lanes),
                "pending": row.pending,
                "dead": row.dead,
                "oldest_pending_age_ms": row.oldest_pending_age_ms,
                "last_error": row.last_error,
                "last_error_at": row.last_error_at,
            })
        })
        .collect();
    HttpResponse::Ok().json(brokers)
}

/// Most dead letters one `GET /dead-letters` returns (each carries up to a few KB of error text).
pub const MAX_DEAD_LETTER_LIMIT: i64 = 1000;

/// The query string as sent: every value is text until `DeadLetterQuery::parse` checks it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterQuery {
    broker: Option<String>,
    since: Option<String>,
    limit: Option<String>,
}

struct DeadLetterFilter {
    broker: Option<String>,
    since: Option<DateTime<Utc>>,
    limit: i64,
}

impl DeadLetterQuery {
    fn parse(self) -> Result<DeadLetterFilter, String> {
        let limit = match self.limit.as_deref() {
            None => MAX_DEAD_LETTER_LIMIT,
            Some(text) => text
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=MAX_DEAD_LETTER_LIMIT).contains(n))
                .ok_or_else(|| {
                    format!("`limit` must be an integer from 1 to {MAX_DEAD_LETTER_LIMIT}")
                })?,
        };
        Ok(DeadLetterFilter {
            broker: self.broker.map(checked_broker).transpose()?,
            since: self.since.as_deref().map(parse_since).transpose()?,
            limit,
        })
    }
}

fn checked_broker(broker: String) -> Result<String, String> {
    match crate::broker::broker_id_problem(&broker) {
        Some(why) => Err(format!("`broker` is not a broker id: {why}")),
        None => Ok(broker),
    }
}

fn parse_since(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|_| {
            "`since` must be an RFC 3339 time such as 2026-11-25T02:00:00Z (a `+` offset must be \
             sent as %2B)"
                .to_owned()
        })
}

pub async fn dead_letters(state: web::Data<AdminState>, request: HttpRequest) -> HttpResponse {
    if let Some(refusal) = authorize_read(&state, &request) {
        return refusal;
    }
    let filter = match web::Query::<DeadLetterQuery>::from_query(request.query_string()) {
        Ok(query) => query.into_inner().parse(),
        Err(error) => Err(format!("invalid query string: {error}")),
    };
    let filter = match filter {
        Ok(filter) => filter,
        Err(message) => return bad_request(message),
    };
    match state
        .ledger
        .dead_letters(filter.broker.as_deref(), filter.since, filter.limit)
        .await
    {
        Ok(letters) => HttpResponse::Ok().json(letters),
        Err(error) => server_error(error),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    id: Option<i64>,
    broker: Option<String>,
    since: Option<String>,
}

impl ReplayRequest {
    fn parse(self) -> Result<ReplaySelector, String> {
        match (self.id, self.broker, self.since) {
            (Some(id), None, None) => Ok(ReplaySelector::Delivery(id)),
            (None, Some(broker), since) => Ok(ReplaySelector::Broker {
                broker_id: checked_broker(broker)?,
                since: since.as_deref().map(parse_since).transpose()?,
            }),
            _ => Err("give exactly one of `id` or `broker` (with optional `since`)".to_owned()),
        }
    }
}

/// The body is read as bytes and parsed only after the token check, so an unauthenticated
/// caller learns nothing about what the route accepts.
pub async fn replay(
    state: web::Data<AdminState>,
    request: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    if let Some(refusal) = authorize(&state, &request) {
        return refusal;
    }
    let selector = serde_json::from_slice::<ReplayRequest>(&body)
        .map_err(|error| format!("invalid JSON body: {error}"))
        .and_then(ReplayRequest::parse);
    let selector = match selector {
        Ok(selector) => selector,
        Err(message) => return bad_request(message),
    };
    match state.ledger.replay(&selector).await {
        Ok(ReplayOutcome::Requeued(ids)) => {
            // The replay's commit announced it to every running instance (Ledger::replay).
            tracing::info!(replayed = ids.len(), "dead letters replayed through the admin API");
            HttpResponse::Ok().json(json!({"requeued": ids}))
        }
        Ok(ReplayOutcome::NotFound) => {
            HttpResponse::NotFound().json(json!({"error": "no such delivery"}))
        }
        Ok(ReplayOutcome::AlreadyDelivered) => HttpResponse::Conflict().json(
            json!({"error": "this delivery was delivered; replaying it would send a duplicate, so it is refused"}),
        ),
        Ok(ReplayOutcome::StillPending) => HttpResponse::Conflict()
            .json(json!({"error": "this delivery is still pending; it will be attempted without a replay"})),
        Err(error) => server_error(error),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackfillBody {
    since: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
    load: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

impl BackfillBody {
    fn parse(self, broker_id: String) -> Result<BackfillRequest, String> {
        if self.until.is_some_and(|until| until <= self.since) {
            return Err("`until` must be later than `since`".to_owned());
        }
        Ok(BackfillRequest {
            broker_id: checked_broker(broker_id)?,
            since: self.since,
            until: self.until,
            load_id: self.load,
            dry_run: self.dry_run,
        })
    }
}

/// Runs the whole backfill before answering. Each batch commits on its own, so a client that
/// gives up early leaves a partial backfill that running it again completes; for windows of
/// millions of events prefer the CLI. Like replay, the body is parsed only after the token check.
pub async fn backfill(
    state: web::Data<AdminState>,
    request: HttpRequest,
    broker_id: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    if let Some(refusal) = authorize(&state, &request) {
        return refusal;
    }
    let request = serde_json::from_slice::<BackfillBody>(&body)
        .map_err(|error| format!("invalid JSON body: {error}"))
        .and_then(|body| body.parse(broker_id.into_inner()));
    let request = match request {
        Ok(request) => request,
        Err(message) => return bad_request(message),
    };
    match state.ledger.backfill(&request).await {
        Ok(BackfillOutcome::Done(summary)) => HttpResponse::Ok().json(summary),
        Ok(BackfillOutcome::UnknownBroker) => {
            HttpResponse::NotFound().json(json!({"error": "no such broker"}))
        }
        Ok(BackfillOutcome::BrokerDisabled { reason }) => HttpResponse::Conflict().json(json!({
            "error": "the broker is disabled: re-enable it first, or its backfilled deliveries would only be dead-lettered",
            "disabled_reason": reason,
        })),
        Err(error) => server_error(error),
    }
}

/// Mutating routes need `Authorization: Bearer <admin.token>`; with no token configured they
/// are off. The token is compared in constant time and never logged.
fn authorize(state: &AdminState, request: &HttpRequest) -> Option<HttpResponse> {
    let Some(expected) = &state.token else {
        return Some(HttpResponse::Forbidden().json(
            json!({"error": "mutating admin routes are off: set admin.token to enable them"}),
        ));
    };
    (!bearer_matches(expected, request)).then(unauthorized)
}

/// Routes that show event ids, load ids or broker response bodies (`/brokers`,
/// `/dead-letters`) need the token too when one is configured. With none they stay open, as
/// the probes and `/metrics` always are: the admin port is then the only protection.
fn authorize_read(state: &AdminState, request: &HttpRequest) -> Option<HttpResponse> {
    let expected = state.token.as_ref()?;
    (!bearer_matches(expected, request)).then(unauthorized)
}

fn bearer_matches(expected: &str, request: &HttpRequest) -> bool {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    presented.len() == expected.len()
        && presented
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn unauthorized() -> HttpResponse {
    HttpResponse::Unauthorized()
        .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
        .json(json!({"error": "missing or wrong bearer token"}))
}

fn bad_request(message: String) -> HttpResponse {
    HttpResponse::BadRequest().json(json!({ "error": message }))
}

/// The detail (SQL, SQLSTATE, host names) goes to the log only; the caller gets a generic
/// message, 503 when the database is away or busy (try again), 500 otherwise.
fn server_error(error: LedgerError) -> HttpResponse {
    tracing::error!(error.message = %error, "admin API request failed");
    if error.is_retryable() {
        HttpResponse::ServiceUnavailable().json(json!({
            "error": "the database is unavailable; try again shortly"
        }))
    } else {
        HttpResponse::InternalServerError().json(json!({
            "error": "internal error; the details are in this instance's log (\"admin API request failed\")"
        }))
    }
}

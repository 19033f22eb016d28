use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;

use super::AdminState;
use crate::actors::delivery_supervisor::{BrokerSnapshots, DeliveriesReplayed};
use crate::ledger::{ReplayOutcome, ReplaySelector};

pub async fn healthz(state: web::Data<AdminState>) -> HttpResponse {
    match state.health.broken() {
        None => HttpResponse::Ok().json(json!({"status": "ok"})),
        Some(reason) => {
            HttpResponse::ServiceUnavailable().json(json!({"status": "broken", "reason": reason}))
        }
    }
}

pub async fn readyz(state: web::Data<AdminState>) -> HttpResponse {
    let database = tokio::time::timeout(Duration::from_secs(2), state.ledger.ping()).await;
    if let Some(reason) = state.health.broken() {
        return HttpResponse::ServiceUnavailable()
            .json(json!({"status": "not ready", "reason": reason}));
    }
    let reason = match database {
        Err(_) => Some("postgres did not answer within 2 s".to_owned()),
        Ok(Err(error)) => Some(format!("postgres: {error}")),
        Ok(Ok(())) if !state.health.joined() => {
            Some("the Kafka consumer has not joined its group yet".to_owned())
        }
        Ok(Ok(())) => None,
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

pub async fn brokers(state: web::Data<AdminState>) -> HttpResponse {
    let live = state
        .deliveries
        .send(BrokerSnapshots)
        .await
        .unwrap_or_default();
    let stored = match state.ledger.broker_statuses().await {
        Ok(rows) => rows,
        Err(error) => return server_error(error),
    };
    let brokers: Vec<_> = stored
        .into_iter()
        .map(|row| {
            // This instance's own breaker when it has one, else the last recorded transition.
            let here = live.iter().find(|s| s.broker_id == row.broker_id);
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
                "in_memory": here.map_or(0, |s| s.in_memory),
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

#[derive(Deserialize)]
pub struct DeadLetterQuery {
    broker: Option<String>,
    since: Option<DateTime<Utc>>,
    limit: Option<i64>,
}

pub async fn dead_letters(
    state: web::Data<AdminState>,
    query: web::Query<DeadLetterQuery>,
) -> HttpResponse {
    match state
        .ledger
        .dead_letters(
            query.broker.as_deref(),
            query.since,
            query.limit.unwrap_or(1000),
        )
        .await
    {
        Ok(letters) => HttpResponse::Ok().json(letters),
        Err(error) => server_error(error),
    }
}

#[derive(Deserialize)]
pub struct ReplayRequest {
    id: Option<i64>,
    broker: Option<String>,
    since: Option<DateTime<Utc>>,
}

pub async fn replay(
    state: web::Data<AdminState>,
    request: HttpRequest,
    body: web::Json<ReplayRequest>,
) -> HttpResponse {
    if let Some(refusal) = authorize(&state, &request) {
        return refusal;
    }
    let selector =
        match (body.id, body.broker.clone()) {
            (Some(id), None) => ReplaySelector::Delivery(id),
            (None, Some(broker_id)) => ReplaySelector::Broker {
                broker_id,
                since: body.since,
            },
            _ => return HttpResponse::BadRequest().json(
                json!({"error": "give exactly one of `id` or `broker` (with optional `since`)"}),
            ),
        };
    match state.ledger.replay(&selector).await {
        Ok(ReplayOutcome::Requeued(ids)) => {
            tracing::info!(replayed = ids.len(), "dead letters replayed through the admin API");
            // So each replayed delivery goes before later ones of its load (the CLI's replays
            // are found by the next ledger sweep instead).
            state.deliveries.do_send(DeliveriesReplayed);
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

/// Mutating routes need `Authorization: Bearer <admin.token>`; with no token configured they
/// are off. The token is compared in constant time and never logged.
fn authorize(state: &AdminState, request: &HttpRequest) -> Option<HttpResponse> {
    let Some(expected) = &state.token else {
        return Some(HttpResponse::Forbidden().json(
            json!({"error": "mutating admin routes are off: set admin.token to enable them"}),
        ));
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let matches = presented.len() == expected.len()
        && presented
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    (!matches).then(|| {
        HttpResponse::Unauthorized()
            .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
            .json(json!({"error": "missing or wrong bearer token"}))
    })
}

fn server_error(error: impl std::fmt::Display) -> HttpResponse {
    tracing::error!(error.message = %error, "admin API request failed");
    HttpResponse::InternalServerError().json(json!({"error": error.to_string()}))
}

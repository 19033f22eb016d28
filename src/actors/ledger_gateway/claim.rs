//! Getting one poll batch into the ledger, whatever it holds: the PartitionActor calls
//! `claim_until_stored` and stores the batch's offset once it returns. An event the database
//! refuses (a data error) is found by splitting the batch, recorded in `rejected_messages` with
//! the reason, and the rest is claimed in order; a database that is away or busy is waited out
//! with backoff (skipping would lose events), so it shows as a stalled partition, never a hang.

use std::time::Duration;

use actix::{Addr, MailboxError};

use super::{ClaimBatch, LedgerGateway, RecordRejected};
use crate::core::bisect::write_in_order;
use crate::ledger::{ClaimedDelivery, ErrorKind, LedgerError, RejectedMessage};

/// How much of a refused event's value is kept in `rejected_messages`.
const REFUSED_VALUE_CAP: usize = 64 * 1024;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why one claim call failed.
#[derive(Debug, thiserror::Error)]
enum ClaimFailure {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("the ledger actor did not answer: {0}")]
    ActorGone(#[source] MailboxError),
}

impl ClaimFailure {
    fn is_data(&self) -> bool {
        matches!(self, ClaimFailure::Ledger(e) if e.kind() == ErrorKind::Data)
    }
}

/// Claims `claim.events` and records `claim.rejected`, retrying until both are stored.
/// Returns the new deliveries in offset order. `last_offset` is only for the log.
pub async fn claim_until_stored(
    ledger: Addr<LedgerGateway>,
    claim: ClaimBatch,
    last_offset: i64,
) -> Vec<ClaimedDelivery> {
    let ClaimBatch {
        topic,
        partition,
        events,
        mut rejected,
    } = claim;
    let mut backoff = FIRST_BACKOFF;
    let mut wait = |error: ClaimFailure| {
        tracing::error!(
            topic = %topic,
            partition,
            offset = last_offset,
            error.message = %error,
            retry_in_ms = backoff.as_millis() as u64,
            "could not write the batch to the ledger; retrying (offsets do not move meanwhile)"
        );
        let delay = backoff;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        tokio::time::sleep(delay)
    };

    let claimed = write_in_order(
        &events,
        |slice| {
            let request = ledger.send(ClaimBatch {
                topic: topic.clone(),
                partition,
                events: slice.to_vec(),
                rejected: Vec::new(),
            });
            async move {
                match request.await {
                    Ok(result) => result
                        .map(|claimed| vec![claimed])
                        .map_err(ClaimFailure::from),
                    Err(error) => Err(ClaimFailure::ActorGone(error)),
                }
            }
        },
        ClaimFailure::is_data,
        &mut wait,
    )
    .await;
    let refused_by_ledger = claimed.refused.len();
    for (index, error) in claimed.refused {
        let (offset, event) = &events[index];
        tracing::warn!(
            topic = %topic,
            partition,
            offset,
            event_id = event.event_id.as_deref().unwrap_or(event.key.as_str()),
            load_id = %event.load_id,
            error.message = %error,
            "event refused by the ledger; recorded in rejected_messages, the partition moves on"
        );
        rejected.push(RejectedMessage {
            offset: *offset,
            // The Kafka key is not carried with a parsed event; the value and offset identify it.
            key: None,
            raw_value: Some(event.payload[..event.payload.len().min(REFUSED_VALUE_CAP)].to_vec()),
            value_bytes: i32::try_from(event.payload.len()).unwrap_or(i32::MAX),
            error: format!("the ledger refused this event: {error}"),
        });
    }
    rejected.sort_by_key(|r| r.offset);

    // Counted once, with the first write.
    let mut refused_by_ledger = refused_by_ledger;
    let recorded = write_in_order(
        &rejected,
        |slice| {
            let request = ledger.send(RecordRejected {
                topic: topic.clone(),
                partition,
                rejected: slice.to_vec(),
                refused_by_ledger: std::mem::take(&mut refused_by_ledger),
            });
            async move {
                match request.await {
                    Ok(result) => result
                        .map(|()| Vec::<()>::new())
                        .map_err(ClaimFailure::from),
                    Err(error) => Err(ClaimFailure::ActorGone(error)),
                }
            }
        },
        ClaimFailure::is_data,
        &mut wait,
    )
    .await;
    for (index, error) in recorded.refused {
        // Its text is made storable and its bytes are bytea: this is not expected to happen.
        tracing::error!(
            topic = %topic,
            partition,
            offset = rejected[index].offset,
            error.message = %error,
            "could not record a rejected message; it is skipped (only this log line remains)"
        );
    }
    claimed.results.into_iter().flatten().collect()
}

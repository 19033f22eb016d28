//! When the group commit of attempt outcomes fails with a data error: find the rows the database
//! refuses, write everything else, and give each refused row a form that can be stored, so one
//! bad row never blocks other rows or other brokers, and is never retried forever.

use std::time::Duration;

use super::LedgerWatch;
use crate::core::bisect::write_in_order;
use crate::ledger::{AttemptOutcome, AttemptRecord, ErrorKind, Ledger, LedgerError};

/// Writes `records` around the rows the database refuses (`first_error` is what the whole
/// batch got). Waits out a database that goes away meanwhile, so when it returns every record
/// has been written, written in a reduced form, or its delivery dead-lettered.
pub(super) async fn save_around_bad_rows(
    ledger: &Ledger,
    records: &[AttemptRecord],
    watch: &LedgerWatch,
    first_error: &LedgerError,
) {
    tracing::warn!(
        outcomes = records.len(),
        error.message = %first_error,
        "the database refused a batch of attempt outcomes; writing it in parts to find the bad rows"
    );
    let mut backoff = Duration::from_millis(500);
    let written = write_in_order(
        records,
        |slice| async move { ledger.record_attempts(slice).await.map(|()| vec![()]) },
        |error: &LedgerError| {
            watch.count("record_attempts", error);
            error.kind() == ErrorKind::Data
        },
        |error| {
            tracing::error!(error.message = %error, retry_in_ms = backoff.as_millis() as u64,
                "could not write attempt outcomes; retrying");
            let delay = backoff;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            tokio::time::sleep(delay)
        },
    )
    .await;
    for (index, error) in written.refused {
        save_reduced(ledger, &records[index], &error, watch).await;
    }
}

/// One refused row: store it with its free text replaced by a fixed note; if even that fails,
/// dead-letter the delivery with the reason, so it is never sent again on an unrecorded attempt.
async fn save_reduced(
    ledger: &Ledger,
    record: &AttemptRecord,
    error: &LedgerError,
    watch: &LedgerWatch,
) {
    let note = "the outcome's text could not be stored (see the service log)";
    let mut reduced = record.clone();
    reduced.error_message = record.error_message.as_ref().map(|_| note.to_owned());
    if let AttemptOutcome::Dead { reason } = &mut reduced.outcome {
        note.clone_into(reason);
    }
    let reduced_result = ledger.record_attempts(std::slice::from_ref(&reduced)).await;
    let fields = (record.delivery_id, record.attempt, record.outcome.as_str());
    match reduced_result {
        Ok(()) => tracing::error!(
            broker_id = %record.broker_id,
            delivery_id = fields.0,
            attempt = fields.1,
            outcome = fields.2,
            error.message = %error,
            "attempt outcome refused by the database; stored without its error text"
        ),
        Err(reduced_error) => {
            watch.count("record_attempts", &reduced_error);
            let reason = format!("its attempt outcome could not be stored: {error}");
            let dead = ledger.dead_letter(record.delivery_id, &reason).await;
            if let Err(dead_error) = &dead {
                watch.count("dead_letter", dead_error);
            }
            tracing::error!(
                broker_id = %record.broker_id,
                delivery_id = fields.0,
                attempt = fields.1,
                outcome = fields.2,
                error.message = %error,
                dead_lettered = dead.is_ok(),
                "attempt outcome refused by the database even without its text; the delivery is dead-lettered"
            );
        }
    }
}

use std::time::Duration;

use actix::{Handler, Message, ResponseFuture};

use super::LedgerGateway;
use crate::core::event::ShipmentEvent;
use crate::core::scheduler::PartitionCursor;
use crate::ledger::{
    AttemptRecord, BrokerRow, CircuitRecord, ClaimedDelivery, LedgerError, PendingDelivery,
    RejectedMessage,
};

/// Records one poll batch: its rejected messages and its events, creating deliveries.
#[derive(Message, Clone)]
#[rtype(result = "Result<Vec<ClaimedDelivery>, LedgerError>")]
pub struct ClaimBatch {
    pub topic: String,
    pub partition: i32,
    pub events: Vec<(i64, ShipmentEvent)>,
    pub rejected: Vec<RejectedMessage>,
}

impl Handler<ClaimBatch> for LedgerGateway {
    type Result = ResponseFuture<Result<Vec<ClaimedDelivery>, LedgerError>>;

    fn handle(&mut self, msg: ClaimBatch, _: &mut Self::Context) -> Self::Result {
        let ledger = self.ledger.clone();
        let watch = self.watch.clone();
        Box::pin(async move {
            let result = async {
                ledger
                    .record_rejected(&msg.topic, msg.partition, &msg.rejected)
                    .await?;
                ledger
                    .claim_batch(&msg.topic, msg.partition, &msg.events)
                    .await
            }
            .await;
            match &result {
                Ok(_) => watch.stalls.claim_succeeded(msg.partition),
                Err(error) => {
                    watch.count("claim", error);
                    watch.stalls.claim_failed(msg.partition, error.to_string());
                }
            }
            result
        })
    }
}

/// Records messages that are not valid events (or that the ledger refused) in
/// `rejected_messages`. `refused_by_ledger` of them are counted as rejected here; the
/// PartitionActor counts the ones that failed to parse.
#[derive(Message)]
#[rtype(result = "Result<(), LedgerError>")]
pub struct RecordRejected {
    pub topic: String,
    pub partition: i32,
    pub rejected: Vec<RejectedMessage>,
    pub refused_by_ledger: usize,
}

impl Handler<RecordRejected> for LedgerGateway {
    type Result = ResponseFuture<Result<(), LedgerError>>;

    fn handle(&mut self, msg: RecordRejected, _: &mut Self::Context) -> Self::Result {
        self.watch
            .metrics
            .messages_rejected
            .with_label_values(&[msg.partition.to_string()])
            .inc_by(msg.refused_by_ledger as u64);
        let ledger = self.ledger.clone();
        let watch = self.watch.clone();
        Box::pin(async move {
            let result = ledger
                .record_rejected(&msg.topic, msg.partition, &msg.rejected)
                .await;
            match &result {
                Ok(()) => watch.stalls.claim_succeeded(msg.partition),
                Err(error) => {
                    watch.count("record_rejected", error);
                    watch.stalls.claim_failed(msg.partition, error.to_string());
                }
            }
            result
        })
    }
}

/// One page of a broker's pending deliveries: up to `per_partition` rows after each cursor.
#[derive(Message)]
#[rtype(result = "Result<Vec<PendingDelivery>, LedgerError>")]
pub struct LoadPending {
    pub broker_id: String,
    pub cursors: Vec<PartitionCursor>,
    pub per_partition: usize,
}

impl Handler<LoadPending> for LedgerGateway {
    type Result = ResponseFuture<Result<Vec<PendingDelivery>, LedgerError>>;

    fn handle(&mut self, msg: LoadPending, _: &mut Self::Context) -> Self::Result {
        let ledger = self.ledger.clone();
        let watch = self.watch.clone();
        Box::pin(async move {
            ledger
                .pending_for_broker(&msg.broker_id, &msg.cursors, msg.per_partition)
                .await
                .inspect_err(|error| watch.count("load_pending", error))
        })
    }
}

#[derive(Message)]
#[rtype(result = "Result<Vec<String>, LedgerError>")]
pub struct FindBrokersWithOverdueWork {
    pub partitions: Vec<i32>,
    pub overdue_for: Duration,
}

impl Handler<FindBrokersWithOverdueWork> for LedgerGateway {
    type Result = ResponseFuture<Result<Vec<String>, LedgerError>>;

    fn handle(&mut self, msg: FindBrokersWithOverdueWork, _: &mut Self::Context) -> Self::Result {
        let ledger = self.ledger.clone();
        let watch = self.watch.clone();
        Box::pin(async move {
            ledger
                .brokers_with_overdue_work(&msg.partitions, msg.overdue_for)
                .await
                .inspect_err(|error| watch.count("overdue_work", error))
        })
    }
}

/// The rows of these brokers (those that exist), in one statement.
#[derive(Message)]
#[rtype(result = "Result<Vec<BrokerRow>, LedgerError>")]
pub struct LoadBrokers {
    pub broker_ids: Vec<String>,
}

impl Handler<LoadBrokers> for LedgerGateway {
    type Result = ResponseFuture<Result<Vec<BrokerRow>, LedgerError>>;

    fn handle(&mut self, msg: LoadBrokers, _: &mut Self::Context) -> Self::Result {
        let ledger = self.ledger.clone();
        let watch = self.watch.clone();
        Box::pin(async move {
            ledger
                .brokers(&msg.broker_ids)
                .await
                .inspect_err(|error| watch.count("load_broker", error))
        })
    }
}

/// A broker's actor retired (idle, so nothing of it is unsaved): its `outcome_write_stalled`
/// series goes too, so brokers that come and go leave no series behind. The next outcome written
/// for it sets it again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ForgetBroker {
    pub broker_id: String,
}

impl Handler<ForgetBroker> for LedgerGateway {
    type Result = ();

    fn handle(&mut self, msg: ForgetBroker, _: &mut Self::Context) {
        if self.outcome_watches.contains_key(&msg.broker_id) {
            // Failing writes are being watched: the series says so; keep it.
            return;
        }
        if self.outcome_gauges.remove(&msg.broker_id) {
            let _ = self
                .watch
                .metrics
                .outcome_write_stalled
                .remove_label_values(&[msg.broker_id.as_str()]);
        }
    }
}

/// Attempt outcomes to write. Answers once they are committed (grouped with other brokers'
/// outcomes into one statement); the error is the ledger's, as text.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct RecordAttempts {
    pub records: Vec<AttemptRecord>,
}

impl Handler<RecordAttempts> for LedgerGateway {
    type Result = ResponseFuture<Result<(), String>>;

    fn handle(&mut self, msg: RecordAttempts, ctx: &mut Self::Context) -> Self::Result {
        let (saved, committed) = tokio::sync::oneshot::channel();
        self.queued_records += msg.records.len();
        self.queued_outcomes.push(super::QueuedOutcomes {
            records: msg.records,
            saved,
        });
        self.write_outcomes(ctx);
        Box::pin(async move {
            committed
                .await
                .unwrap_or_else(|_| Err("the ledger actor stopped".to_owned()))
        })
    }
}

#[derive(Message)]
#[rtype(result = "Result<(), LedgerError>")]
pub struct DisableBroker {
    pub broker_id: String,
    pub reason: String,
}

impl Handler<DisableBroker> for LedgerGateway {
    type Result = ResponseFuture<Result<(), LedgerError>>;

    fn handle(&mut self, msg: DisableBroker, _: &mut Self::Context) -> Self::Result {
        let ledger = self.ledger.clone();
        let watch = self.watch.clone();
        Box::pin(async move {
            ledger
                .disable_broker(&msg.broker_id, &msg.reason)
                .await
                .inspect_err(|error| watch.count("disable_broker", error))
        })
    }
}

/// Takes or renews a partition lease; `Ok(false)` while another instance still holds it.
#[derive(Message)]
#[rtype(result = "Result<bool, LedgerError>")]
pub struct AcquireLease {
    pub topic: String,
    pub partition: i32,
    pub owner: String,
    pub lease: Duration,
}

impl Handler<AcquireLease> for LedgerGateway {
    type Result = ResponseFuture<Result<bool, LedgerError>>;

    fn handle(&mut self, msg: AcquireLease, _: &mut Self::Context) -> Self::Result {
        let ledger = self.ledger.clone();
        let watch = self.watch.clone();
        Box::pin(async move {
            ledger
                .acquire_lease(&msg.topic, msg.partition, &msg.owner, msg.lease)
                .await
                .inspect_err(|error| watch.count("acquire_lease", error))
        })
    }
}

#[derive(Message)]
#[rtype(result = "Result<(), LedgerError>")]
pub struct ReleaseLease {
    pub topic: String,
    pub partition: i32,
    pub owner: String,
    pub linger: Duration,
}

impl Handler<ReleaseLease> for LedgerGateway {
    type Result = ResponseFuture<Result<(), LedgerError>>;

    fn handle(&mut self, msg: ReleaseLease, _: &mut Self::Context) -> Self::Result {
        let ledger = self.ledger.clone();
        let watch = self.watch.clone();
        Box::pin(async move {
            ledger
                .release_lease(&msg.topic, msg.partition, &msg.owner, msg.linger)
                .await
                .inspect_err(|error| watch.count("release_lease", error))
        })
    }
}

/// Stores a breaker transition for `status` and the admin API. Best effort: a failure is logged.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RecordCircuit(pub CircuitRecord);

impl Handler<RecordCircuit> for LedgerGateway {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: RecordCircuit, _: &mut Self::Context) -> Self::Result {
        let ledger = self.ledger.clone();
        let watch = self.watch.clone();
        Box::pin(async move {
            if let Err(error) = ledger.record_circuit(&msg.0).await {
                watch.count("record_circuit", &error);
                tracing::warn!(broker_id = %msg.0.broker_id, error.message = %error, "could not store circuit state");
            }
        })
    }
}

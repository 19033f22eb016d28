//! One assignment of one partition to this instance, shared by the supervisor that granted it,
//! the reader task that reads its queue and the PartitionActor that claims its batches.
//!
//! It carries the two rules that keep a partition's offsets honest across rebalances:
//! - **offsets never move backwards** and only a live tenure stores them: once a revocation's
//!   drain window has ended, a batch that finishes late stores nothing (its rows are in the
//!   ledger, and the next reader re-reads them from the committed offset: claims are idempotent);
//! - **a successor knows where to resume**: the lowest offset this tenure read but did not get
//!   into the ledger;
//! - **a successor knows when this tenure's actor has stopped**, i.e. its last claim is over: a
//!   new tenure of the partition reads, claims and takes the lease only after that, so two claims
//!   of one partition never run at once on this instance (a claim that ran alongside an older,
//!   slower one could not see that one's rows as pending predecessors of its load, and a later
//!   status could be sent first).

use std::sync::Mutex;

use tokio::sync::watch;

/// What happened to a request to store an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDecision {
    /// Store it: it is past everything stored before.
    Store,
    /// Not past what is already stored (`stored`): storing it would move the offset backwards.
    Behind { stored: i64 },
    /// The tenure ended (revoked and its drain window is over): the next reader owns the offset.
    Ended,
}

#[derive(Debug, Default)]
struct Progress {
    /// The first offset this tenure read from its queue.
    first_read: Option<i64>,
    /// The last offset whose ledger row is committed and whose offset was stored.
    stored_through: Option<i64>,
    /// The batch handed to the actor and not yet in the ledger (first, last offset).
    in_hand: Option<(i64, i64)>,
    ended: bool,
    /// The generation of the lease this tenure holds in the LeaseBook (announced to the
    /// DeliverySupervisor), if any.
    lease_generation: Option<u64>,
}

pub struct Tenure {
    pub partition: i32,
    revoked: watch::Sender<bool>,
    actor_stopped: watch::Sender<bool>,
    progress: Mutex<Progress>,
}

impl Tenure {
    pub fn new(partition: i32) -> Tenure {
        Tenure {
            partition,
            revoked: watch::Sender::new(false),
            actor_stopped: watch::Sender::new(false),
            progress: Mutex::default(),
        }
    }

    /// The tenure's PartitionActor has stopped: no claim of this tenure is running any more.
    pub fn mark_actor_stopped(&self) {
        self.actor_stopped.send_replace(true);
    }

    pub fn is_actor_stopped(&self) -> bool {
        *self.actor_stopped.borrow()
    }

    /// Resolves once the tenure's PartitionActor has stopped.
    pub async fn actor_stopped(&self) {
        let mut stopped = self.actor_stopped.subscribe();
        let _ = stopped.wait_for(|stopped| *stopped).await;
    }

    /// The partition is being taken away: the reader stops taking messages at once, the lease
    /// stops being renewed. The batch in hand may still finish and store its offset until
    /// [`Tenure::end`].
    pub fn revoke(&self) {
        self.revoked.send_replace(true);
    }

    pub fn is_revoked(&self) -> bool {
        *self.revoked.borrow()
    }

    /// Resolves once the tenure is revoked.
    pub async fn revoked(&self) {
        let mut revoked = self.revoked.subscribe();
        // The sender lives in self, so the channel cannot close while this runs.
        let _ = revoked.wait_for(|revoked| *revoked).await;
    }

    /// Records a granted lease; `announce` runs (under the tenure's lock, so that it cannot
    /// interleave with [`Tenure::revoke_lease`]) when the generation is new. False when the tenure
    /// was revoked meanwhile: the caller withdraws the grant, and nothing was announced.
    pub fn hold_lease(&self, generation: u64, announce: impl FnOnce()) -> bool {
        let mut progress = self.lock();
        if self.is_revoked() {
            return false;
        }
        if progress.lease_generation.replace(generation) != Some(generation) {
            announce();
        }
        true
    }

    /// The lease was lost (another instance holds it): the generation it held, if any.
    pub fn lose_lease(&self) -> Option<u64> {
        self.lock().lease_generation.take()
    }

    /// Revokes the tenure and withdraws the lease it held, if any (`withdraw` runs under the
    /// same lock as [`Tenure::hold_lease`], so a grant is either withdrawn here or never
    /// announced).
    pub fn revoke_lease(&self, withdraw: impl FnOnce(u64)) {
        let mut progress = self.lock();
        self.revoke();
        if let Some(generation) = progress.lease_generation.take() {
            withdraw(generation);
        }
    }

    /// The drain window is over: nothing more is stored under this tenure.
    pub fn end(&self) {
        self.revoke();
        self.lock().ended = true;
    }

    /// The reader took `first..=last` from the queue and hands it to the actor.
    pub fn handed_over(&self, first: i64, last: i64) {
        let mut progress = self.lock();
        progress.first_read.get_or_insert(first);
        progress.in_hand = Some((first, last));
    }

    /// The reader took messages from `first` on but drops them (revoked before handing them over).
    pub fn dropped_from(&self, first: i64) {
        self.lock().first_read.get_or_insert(first);
    }

    /// The batch ending at `last` is in the ledger: may its offset be stored? If so it is
    /// recorded as stored, so call this right before storing.
    pub fn settle(&self, last: i64) -> StoreDecision {
        let mut progress = self.lock();
        if progress
            .in_hand
            .is_some_and(|(_, in_hand_last)| in_hand_last == last)
        {
            progress.in_hand = None;
        }
        if progress.ended {
            return StoreDecision::Ended;
        }
        match progress.stored_through {
            Some(stored) if stored >= last => StoreDecision::Behind { stored },
            _ => {
                progress.stored_through = Some(last);
                StoreDecision::Store
            }
        }
    }

    /// Where a successor reader must start so that nothing this tenure read is skipped: the
    /// offset after the last stored one, else the first offset it read. `None`: it read nothing.
    pub fn resume_from(&self) -> Option<i64> {
        let progress = self.lock();
        progress
            .stored_through
            .map(|stored| stored + 1)
            .or(progress.first_read)
    }

    /// The batch still in the actor's hands (first, last offset), for the drain-timeout log line.
    pub fn in_hand(&self) -> Option<(i64, i64)> {
        self.lock().in_hand
    }

    /// The last offset stored under this tenure.
    pub fn stored_through(&self) -> Option<i64> {
        self.lock().stored_through
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_only_move_forwards() {
        let tenure = Tenure::new(0);
        tenure.handed_over(10, 19);
        assert_eq!(tenure.settle(19), StoreDecision::Store);
        assert_eq!(tenure.settle(15), StoreDecision::Behind { stored: 19 });
        assert_eq!(tenure.settle(19), StoreDecision::Behind { stored: 19 });
        assert_eq!(tenure.settle(20), StoreDecision::Store);
        assert_eq!(tenure.stored_through(), Some(20));
    }

    #[test]
    fn an_ended_tenure_stores_nothing_even_if_its_batch_finishes_late() {
        let tenure = Tenure::new(3);
        tenure.handed_over(0, 9);
        tenure.revoke();
        // Within the drain window the batch in hand may still store.
        assert_eq!(tenure.in_hand(), Some((0, 9)));
        assert_eq!(tenure.settle(9), StoreDecision::Store);
        tenure.handed_over(10, 19);
        tenure.end();
        assert_eq!(tenure.settle(19), StoreDecision::Ended);
        assert_eq!(tenure.resume_from(), Some(10));
    }

    #[test]
    fn a_successor_resumes_at_the_first_message_not_in_the_ledger() {
        let tenure = Tenure::new(1);
        assert_eq!(tenure.resume_from(), None);
        tenure.dropped_from(42);
        assert_eq!(tenure.resume_from(), Some(42));
        let tenure = Tenure::new(1);
        tenure.handed_over(5, 7);
        assert_eq!(tenure.resume_from(), Some(5));
        tenure.settle(7);
        assert_eq!(tenure.resume_from(), Some(8));
    }

    #[test]
    fn revoking_and_stopping_are_seen_by_waiters_and_by_polls() {
        let tenure = Tenure::new(2);
        assert!(!tenure.is_revoked());
        tenure.revoke();
        assert!(tenure.is_revoked());
        futures::executor::block_on(tenure.revoked());
        assert!(!tenure.is_actor_stopped());
        tenure.mark_actor_stopped();
        assert!(tenure.is_actor_stopped());
        futures::executor::block_on(tenure.actor_stopped());
    }
}

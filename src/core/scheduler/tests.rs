//! Unit tests of the scheduler, one per rule it keeps (and one per bug of issue 11 it fixes).
//! The simulator (tests/simulation.rs) checks the same rules over random interleavings.

use std::time::Duration;

use super::*;

type Sched = Scheduler<(), ()>;

const CONFIG: SchedulerConfig = SchedulerConfig {
    capacity: 10,
    max_in_flight: 4,
    adaptive_in_flight: false,
    request_timeout: Duration::from_secs(10),
    endpoint_refresh: Duration::from_secs(5),
    retry: RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_secs(30),
        max_delay: Duration::from_secs(60),
    },
    breaker: BreakerConfig {
        failure_threshold: 2,
        failure_ratio: 0.5,
        min_requests: 100,
        window: Duration::from_secs(30),
        open: Duration::from_secs(5),
        max_open: Duration::from_secs(60),
        half_open_probes: 1,
    },
};

fn delivery(id: i64, load: &str, offset: i64) -> Delivery<()> {
    Delivery {
        id,
        load: load.to_owned(),
        partition: 0,
        offset,
        attempts: 0,
        due_in: Duration::ZERO,
        item: (),
    }
}

fn claim(id: i64, load: &str, offset: i64, predecessor: Option<i64>) -> Claimed<()> {
    Claimed {
        delivery: delivery(id, load, offset),
        pending_predecessor: predecessor,
        claimed_at: Millis(5),
    }
}

const OK: AttemptResult = AttemptResult::Responded {
    status: 200,
    retry_after: None,
};
const FAILED: AttemptResult = AttemptResult::Responded {
    status: 503,
    retry_after: None,
};

/// A scheduler with partition 0's lease, a usable endpoint and an empty ledger.
fn ready(config: SchedulerConfig) -> (Sched, Vec<Command<(), ()>>) {
    let mut s = Sched::new(config, Millis(0));
    s.lease_gained(Millis(0), 0, 1);
    let mut out = Vec::new();
    answer_loads(&mut s, Millis(0), &mut out, &[]);
    s.claimed(Millis(0), Vec::new());
    (s, out)
}

/// Drains the commands; answers broker reads (usable) and ledger reads (with `rows`).
fn answer_loads(s: &mut Sched, now: Millis, out: &mut Vec<Command<(), ()>>, rows: &[Delivery<()>]) {
    let mut rounds = 0;
    loop {
        let mut answered = false;
        while let Some(command) = s.poll_command() {
            match command {
                Command::LoadBroker => {
                    s.broker_loaded(now, now, Ok(()));
                    answered = true;
                }
                Command::LoadPending {
                    token,
                    cursors,
                    per_partition,
                } => {
                    s.loaded(now, token, page(rows, &cursors, per_partition));
                    answered = true;
                }
                other => out.push(other),
            }
        }
        rounds += 1;
        if !answered || rounds > 10 {
            break;
        }
    }
}

/// What the ledger answers a `LoadPending`: each cursor's partition's rows after its offset,
/// up to `per_partition` of them, in (partition, offset) order.
fn page(
    rows: &[Delivery<()>],
    cursors: &[PartitionCursor],
    per_partition: usize,
) -> Vec<Delivery<()>> {
    let mut page: Vec<Delivery<()>> = cursors
        .iter()
        .flat_map(|cursor| {
            let mut of_partition: Vec<_> = rows
                .iter()
                .filter(|r| r.partition == cursor.partition)
                .filter(|r| cursor.after.is_none_or(|a| r.offset > a))
                .collect();
            of_partition.sort_by_key(|r| r.offset);
            of_partition.into_iter().take(per_partition).cloned()
        })
        .collect();
    page.sort_by_key(|r| (r.partition, r.offset));
    page
}

fn sends(out: &mut Vec<Command<(), ()>>) -> Vec<(AttemptToken, i64)> {
    let mut sent = Vec::new();
    out.retain(|c| match c {
        Command::Send {
            token, delivery_id, ..
        } => {
            sent.push((*token, *delivery_id));
            false
        }
        _ => true,
    });
    sent
}

/// The ids of the deliveries sent, in order (the sends are taken out of `out`).
fn sent_ids(out: &mut Vec<Command<(), ()>>) -> Vec<i64> {
    sends(out).into_iter().map(|(_, id)| id).collect()
}

fn writes(out: &mut Vec<Command<(), ()>>) -> Vec<(IoToken, Vec<Outcome<()>>)> {
    let mut written = Vec::new();
    out.retain(|c| match c {
        Command::WriteOutcomes { token, outcomes } => {
            written.push((*token, outcomes.clone()));
            false
        }
        _ => true,
    });
    written
}

/// Acknowledges every outcome write until none is left; returns the other commands.
fn save_all(s: &mut Sched, now: Millis) -> Vec<Command<(), ()>> {
    let mut rest = Vec::new();
    loop {
        let mut out = drain(s, now);
        let written = writes(&mut out);
        rest.append(&mut out);
        if written.is_empty() {
            return rest;
        }
        for (token, _) in written {
            s.outcomes_saved(now, token);
        }
    }
}

fn finish(s: &mut Sched, now: Millis, token: AttemptToken, result: AttemptResult) {
    s.attempt_finished(now, token, result, 0.5, ());
}

fn drain(s: &mut Sched, now: Millis) -> Vec<Command<(), ()>> {
    let mut out = Vec::new();
    answer_loads(s, now, &mut out, &[]);
    out
}

#[test]
fn a_slot_is_free_when_the_answer_is_in_and_the_lane_waits_for_the_save() {
    let (mut s, _) = ready(SchedulerConfig {
        max_in_flight: 1,
        ..CONFIG
    });
    let t = Millis(10);
    s.claimed(
        t,
        vec![
            claim(1, "A", 1, None),
            claim(2, "A", 2, Some(1)),
            claim(3, "B", 3, None),
        ],
    );
    let mut out = drain(&mut s, t);
    let first = sends(&mut out);
    assert_eq!(first.iter().map(|(_, id)| *id).collect::<Vec<_>>(), vec![1]);
    finish(&mut s, t, first[0].0, OK);
    let mut out = drain(&mut s, t);
    let next = sends(&mut out);
    assert_eq!(
        next.iter().map(|(_, id)| *id).collect::<Vec<_>>(),
        vec![3],
        "B goes while A's outcome is being saved; A#2 waits for the save"
    );
    let saves = writes(&mut out);
    s.outcomes_saved(t, saves[0].0);
    finish(&mut s, t, next[0].0, OK);
    let mut out = drain(&mut s, t);
    assert_eq!(sent_ids(&mut out), vec![2]);
}

/// Few lanes, nothing to batch: each outcome is written at once, so no lane waits for another
/// lane's save. Many outcomes: writes stop multiplying once those under way hold
/// `SMALL_WRITES_OUTCOMES`, and what is decided meanwhile goes out in one batch.
#[test]
fn small_writes_start_at_once_and_busy_brokers_batch() {
    let (mut s, _) = ready(CONFIG);
    let t = Millis(10);
    s.claimed(
        t,
        (1..=3)
            .map(|i| claim(i, &format!("L{i}"), i, None))
            .collect(),
    );
    let mut out = drain(&mut s, t);
    for (token, _) in sends(&mut out) {
        finish(&mut s, t, token, OK);
    }
    let mut out = drain(&mut s, t);
    assert_eq!(
        writes(&mut out).len(),
        3,
        "three lanes, three writes under way"
    );

    let (mut s, _) = ready(SchedulerConfig {
        capacity: 40,
        max_in_flight: 20,
        ..CONFIG
    });
    s.claimed(
        t,
        (1..=20)
            .map(|i| claim(i, &format!("L{i}"), i, None))
            .collect(),
    );
    let mut out = drain(&mut s, t);
    for (token, _) in sends(&mut out) {
        finish(&mut s, t, token, OK);
    }
    let mut out = drain(&mut s, t);
    let under_way = writes(&mut out);
    assert_eq!(under_way.len(), SMALL_WRITES_OUTCOMES);
    s.outcomes_saved(t, under_way[0].0);
    let mut out = drain(&mut s, t);
    let next = writes(&mut out);
    assert_eq!(next.len(), 1);
    assert_eq!(
        next[0].1.len(),
        20 - SMALL_WRITES_OUTCOMES,
        "the rest, in one batch"
    );
}

/// Bug 1: disabling a broker while its breaker is open left it half-open forever.
#[test]
fn a_disabled_broker_does_not_leave_the_breaker_half_open() {
    let (mut s, _) = ready(CONFIG);
    let t = Millis(10);
    s.claimed(t, vec![claim(1, "A", 1, None), claim(2, "B", 2, None)]);
    let mut out = drain(&mut s, t);
    for (token, _) in sends(&mut out) {
        finish(&mut s, t, token, FAILED);
    }
    let mut out = drain(&mut s, t);
    for (token, _) in writes(&mut out) {
        s.outcomes_saved(t, token);
    }
    assert_eq!(s.breaker().state().name(), "open");
    // On-call disables the broker; the refreshed row says so.
    let t = Millis(6_000);
    s.broker_changed(t);
    let mut out = Vec::new();
    while let Some(c) = s.poll_command() {
        if matches!(c, Command::LoadBroker) {
            s.broker_loaded(
                t,
                t,
                Err(Unusable {
                    class: "broker_disabled",
                    reason: "broker disabled".into(),
                }),
            );
        } else {
            out.push(c);
        }
    }
    assert_eq!(s.breaker().state().name(), "half_open");
    assert_eq!(
        s.breaker().probes_in_flight(),
        0,
        "dead letters are not probes"
    );
    // Re-enabled and healthy: the next delivery is the probe and closes the breaker.
    let t = Millis(12_000);
    s.broker_changed(t);
    s.claimed(t, vec![claim(3, "C", 3, None)]);
    let mut out = drain(&mut s, t);
    let probe = sends(&mut out);
    assert_eq!(probe.len(), 1);
    finish(&mut s, t, probe[0].0, OK);
    assert_eq!(s.breaker().state().name(), "closed");
}

/// Bug 1, second half: a probe whose request is not made gives its slot back.
#[test]
fn a_probe_not_made_is_given_back() {
    let (mut s, _) = ready(CONFIG);
    let t = Millis(10);
    s.claimed(t, vec![claim(1, "A", 1, None), claim(2, "B", 2, None)]);
    let mut out = drain(&mut s, t);
    for (token, _) in sends(&mut out) {
        finish(&mut s, t, token, FAILED);
    }
    let mut out = drain(&mut s, t);
    for (token, _) in writes(&mut out) {
        s.outcomes_saved(t, token);
    }
    let t = Millis(60_000);
    s.tick(t);
    let mut out = drain(&mut s, t);
    let probe = sends(&mut out);
    assert_eq!(probe.len(), 1, "one probe");
    s.attempt_not_made(t, probe[0].0, NotMade::LeaseLapsed);
    // The only probe slot is free again: the other load's retry takes it.
    let mut out = drain(&mut s, t);
    let next = sends(&mut out);
    assert_eq!(
        next.len(),
        1,
        "the slot was given back and taken by the next probe"
    );
    assert_ne!(next[0].1, probe[0].1);
    assert_eq!(s.breaker().probes_in_flight(), 1);
}

/// A request this process could not make (out of file descriptors or of its connection
/// budget) is our shortage: the attempt is not counted, the breaker hears nothing, and the broker
/// pauses before it tries again, with the same attempt number.
#[test]
fn a_local_shortage_pauses_the_broker_without_counting_against_it() {
    let (mut s, _) = ready(SchedulerConfig {
        breaker: BreakerConfig {
            failure_threshold: 1,
            ..CONFIG.breaker
        },
        ..CONFIG
    });
    let t = Millis(10);
    s.claimed(t, vec![claim(1, "A", 1, None), claim(2, "B", 2, None)]);
    let mut out = drain(&mut s, t);
    let sent = sends(&mut out);
    assert_eq!(sent.len(), 2);
    for (token, _) in &sent {
        s.attempt_not_made(t, *token, NotMade::LocalShortage);
    }
    let mut out = drain(&mut s, t);
    assert!(sends(&mut out).is_empty(), "paused: nothing starts at once");
    assert!(writes(&mut out).is_empty(), "nothing to record");
    assert_eq!(s.breaker().state().name(), "closed");
    assert_eq!(s.breaker().consecutive_failures(), 0);
    let resume = t + LOCAL_SHORTAGE_PAUSE;
    assert_eq!(s.next_wakeup(t), Some(resume));
    s.tick(Millis(resume.0 - 1));
    assert!(sends(&mut drain(&mut s, Millis(resume.0 - 1))).is_empty());
    s.tick(resume);
    let mut out = drain(&mut s, resume);
    let again: Vec<u32> = out
        .iter()
        .filter_map(|c| match c {
            Command::Send { attempt, .. } => Some(*attempt),
            _ => None,
        })
        .collect();
    assert_eq!(again, vec![1, 1], "both go again as their first attempt");
    for (token, _) in sends(&mut out) {
        finish(&mut s, resume, token, OK);
    }
    let rest = save_all(&mut s, resume);
    assert!(sends(&mut rest.clone()).is_empty());
    assert!(s.is_idle());
}

/// A broker short of a further socket goes on with the ones it has: the pause ends when one of
/// its requests finishes (its socket is free again), not a second later.
#[test]
fn a_local_shortage_pause_ends_when_a_request_of_the_broker_finishes() {
    let (mut s, _) = ready(CONFIG);
    let t = Millis(10);
    s.claimed(t, vec![claim(1, "A", 1, None), claim(2, "B", 2, None)]);
    let mut out = drain(&mut s, t);
    let sent = sends(&mut out);
    let (a, b) = (sent[0], sent[1]);
    s.attempt_not_made(t, b.0, NotMade::LocalShortage);
    assert!(sends(&mut drain(&mut s, t)).is_empty(), "paused");
    let t = Millis(20);
    finish(&mut s, t, a.0, OK);
    let mut out = drain(&mut s, t);
    let again = sends(&mut out);
    assert_eq!(again.len(), 1, "the freed socket is used at once");
    assert_eq!(again[0].1, b.1);
}

/// Claims one delivery of each of the loads F1 to F3, answers every request with `result`
/// (a retryable failure) and saves the outcomes: three retries waiting in memory.
fn fill_with_retries(s: &mut Sched, now: Millis, result: AttemptResult) {
    s.claimed(
        now,
        (1..=3)
            .map(|i| claim(i, &format!("F{i}"), i, None))
            .collect(),
    );
    let mut out = drain(s, now);
    for (token, _) in sends(&mut out) {
        finish(s, now, token, result.clone());
    }
    save_all(s, now);
}

/// How many ledger reads the commands queued so far ask for (the commands are taken).
fn ledger_reads_asked(s: &mut Sched) -> usize {
    std::iter::from_fn(|| s.poll_command())
        .filter(|c| matches!(c, Command::LoadPending { .. }))
        .count()
}

/// Bug 2: deliveries waiting for a retry kept healthy loads out of memory.
#[test]
fn retries_give_way_to_ready_loads() {
    let (mut s, _) = ready(SchedulerConfig {
        capacity: 3,
        breaker: BreakerConfig {
            failure_threshold: 100,
            ..CONFIG.breaker
        },
        ..CONFIG
    });
    let t = Millis(10);
    fill_with_retries(&mut s, t, AttemptResult::TransportFailed);
    assert_eq!(s.held(), 3, "three retries wait 30 s");
    s.claimed(
        t,
        vec![claim(10, "H1", 10, None), claim(11, "H2", 11, None)],
    );
    let mut out = drain(&mut s, t);
    let sent: Vec<i64> = sends(&mut out).iter().map(|(_, id)| *id).collect();
    assert_eq!(sent, vec![10, 11], "healthy loads go at once");
    assert!(s.held() <= 3);
    assert!(
        s.next_wakeup(t).is_some(),
        "the given-back retries are read again when due"
    );
}

/// An open breaker lets nothing out, so a sweep then could only read rows that must wait: an
/// unavailable broker read its whole backlog again after every claim that did not fit.
#[test]
fn an_open_breaker_reads_the_ledger_only_once_probes_may_go() {
    let (mut s, _) = ready(SchedulerConfig {
        capacity: 3,
        ..CONFIG
    });
    let t = Millis(10);
    fill_with_retries(&mut s, t, FAILED);
    let open_until = s.breaker().open_until().expect("two failures open it");
    assert_eq!(s.held(), 3, "memory is full of retries");
    // More was claimed for this broker than fits: a sweep is wanted.
    s.ledger_has_more(t);
    assert_eq!(
        ledger_reads_asked(&mut s),
        0,
        "nothing is read while the breaker is open"
    );
    assert!(s.next_wakeup(t).is_some_and(|at| at <= open_until));
    s.tick(open_until);
    assert_eq!(s.breaker().state().name(), "half_open");
    assert_eq!(
        ledger_reads_asked(&mut s),
        1,
        "the wanted sweep runs once probes may go"
    );
}

/// Bug 3: after a restart, a late outcome of the old incarnation acted on the reloaded lanes.
#[test]
fn answers_from_before_a_restart_are_ignored() {
    let (mut s, _) = ready(CONFIG);
    let t = Millis(10);
    s.claimed(t, vec![claim(1, "A", 1, None)]);
    let mut out = drain(&mut s, t);
    let old = sends(&mut out);
    s.restarted(t);
    let rows = [delivery(1, "A", 1), delivery(2, "A", 2)];
    let mut out = Vec::new();
    answer_loads(&mut s, t, &mut out, &rows);
    let new = sends(&mut out);
    assert_eq!(new.iter().map(|(_, id)| *id).collect::<Vec<_>>(), vec![1]);
    finish(&mut s, t, old[0].0, OK);
    assert_eq!(s.in_flight(), 1, "the old answer changed nothing");
    let mut out = drain(&mut s, t);
    assert!(sends(&mut out).is_empty(), "A#2 still waits behind A#1");
}

/// Bug 3: an outcome decided before a restart is saved, and its lane waits for it.
#[test]
fn an_unsaved_outcome_survives_a_restart_and_blocks_its_load() {
    let (mut s, _) = ready(CONFIG);
    let t = Millis(10);
    s.claimed(t, vec![claim(1, "A", 1, None), claim(2, "B", 2, None)]);
    let mut out = drain(&mut s, t);
    let sent = sends(&mut out);
    finish(&mut s, t, sent[0].0, OK);
    let mut out = drain(&mut s, t);
    let under_way = writes(&mut out);
    finish(&mut s, t, sent[1].0, OK);
    s.restarted(t);
    let rows = [
        delivery(1, "A", 1),
        delivery(3, "A", 3),
        delivery(2, "B", 2),
    ];
    let mut out = Vec::new();
    answer_loads(&mut s, t, &mut out, &rows);
    assert!(
        sends(&mut out).is_empty(),
        "1 and 2 are decided; 3 waits for 1's save"
    );
    let written: Vec<i64> = writes(&mut out)
        .into_iter()
        .flat_map(|(_, outcomes)| outcomes.into_iter().map(|o| o.delivery_id))
        .collect();
    assert_eq!(
        written,
        vec![2],
        "2's outcome is written; the write under way (1) is not repeated"
    );
    s.outcomes_saved(t, under_way[0].0);
    let mut out = drain(&mut s, t);
    assert_eq!(sent_ids(&mut out), vec![3], "1 saved: its load moves on");
}

/// Bug 4: a replayed delivery goes before later ones of its load, even a waiting retry.
#[test]
fn a_replayed_delivery_goes_before_later_ones_of_its_load() {
    let (mut s, _) = ready(CONFIG);
    let t = Millis(10);
    s.claimed(t, vec![claim(5, "A", 5, None)]);
    let mut out = drain(&mut s, t);
    let sent = sends(&mut out);
    finish(&mut s, t, sent[0].0, FAILED);
    let mut out = drain(&mut s, t);
    s.outcomes_saved(t, writes(&mut out)[0].0);
    // Delivery 1 (offset 1) of A was dead and is replayed; a new event 9 is claimed.
    s.replayed(t);
    let mut retried = delivery(5, "A", 5);
    retried.attempts = 1;
    retried.due_in = Duration::from_secs(30);
    let rows = [delivery(1, "A", 1), retried];
    let mut out = Vec::new();
    answer_loads(&mut s, t, &mut out, &rows);
    s.claimed(t, vec![claim(9, "A", 9, Some(5))]);
    let mut out2 = drain(&mut s, t);
    out.append(&mut out2);
    assert_eq!(
        sent_ids(&mut out),
        vec![1],
        "the replayed one first, not 9, not behind 5's retry"
    );
}

/// Bug 4, first half: a claim whose predecessor finished here is not trusted to follow it.
#[test]
fn a_claim_after_a_finished_predecessor_reads_the_ledger() {
    let (mut s, _) = ready(CONFIG);
    let t = Millis(10);
    s.claimed(t, vec![claim(5, "A", 5, None)]);
    let mut out = drain(&mut s, t);
    let sent = sends(&mut out);
    finish(&mut s, t, sent[0].0, OK);
    let mut out = drain(&mut s, t);
    s.outcomes_saved(t, writes(&mut out)[0].0);
    // 5 was delivered, then replayed; the claim of 9 sees it pending.
    s.claimed(t, vec![claim(9, "A", 9, Some(5))]);
    let mut out = Vec::new();
    answer_loads(
        &mut s,
        t,
        &mut out,
        &[delivery(5, "A", 5), delivery(9, "A", 9)],
    );
    assert_eq!(sent_ids(&mut out), vec![5]);
}

/// Bug 5: a ledger page read while an outcome was saved still shows it pending.
#[test]
fn a_page_read_during_a_save_does_not_bring_back_what_it_saved() {
    let (mut s, _) = ready(CONFIG);
    let t = Millis(10);
    s.claimed(t, vec![claim(1, "A", 1, None)]);
    let mut out = drain(&mut s, t);
    let sent = sends(&mut out);
    finish(&mut s, t, sent[0].0, OK);
    let mut out = Vec::new();
    while let Some(c) = s.poll_command() {
        out.push(c);
    }
    let save = writes(&mut out);
    s.ledger_has_more(t);
    let page = loop {
        match s.poll_command() {
            Some(Command::LoadPending { token, .. }) => break token,
            Some(_) => continue,
            None => panic!("a page read was asked for"),
        }
    };
    s.outcomes_saved(t, save[0].0);
    // The page's snapshot predates the commit.
    s.loaded(t, page, vec![delivery(1, "A", 1)]);
    let mut out = drain(&mut s, t);
    assert!(sends(&mut out).is_empty(), "delivered once, never again");
    assert_eq!(s.held(), 0);
}

/// Bug 6: a late revoke of an old lease does not drop the newer one.
#[test]
fn a_stale_revoke_does_not_drop_a_newer_lease() {
    let mut s = Sched::new(CONFIG, Millis(0));
    s.lease_gained(Millis(0), 0, 1);
    s.lease_gained(Millis(1), 0, 2);
    s.lease_lost(Millis(2), 0, 1);
    assert!(s.holds_lease(0));
    s.lease_lost(Millis(3), 0, 2);
    assert!(!s.holds_lease(0));
    s.lease_gained(Millis(4), 0, 2);
    assert!(!s.holds_lease(0), "a stale grant is ignored too");
}

#[test]
fn deliveries_of_an_unusable_broker_are_dead_lettered_without_a_request() {
    let mut s = Sched::new(CONFIG, Millis(0));
    s.lease_gained(Millis(0), 0, 1);
    s.claimed(Millis(0), vec![claim(1, "A", 1, None)]);
    let mut out = Vec::new();
    while let Some(c) = s.poll_command() {
        match c {
            Command::LoadBroker => s.broker_loaded(
                Millis(0),
                Millis(0),
                Err(Unusable {
                    class: "invalid_broker",
                    reason: "no URL".into(),
                }),
            ),
            Command::LoadPending { token, .. } => s.loaded(Millis(0), token, Vec::new()),
            other => out.push(other),
        }
    }
    assert!(sends(&mut out).is_empty());
    let written = writes(&mut out);
    assert_eq!(
        written[0].1[0].decision,
        Decision::Dead {
            reason: "no URL".into()
        }
    );
    assert_eq!(s.breaker().state().name(), "closed");
}

#[test]
fn attempts_never_exceed_the_budget() {
    let (mut s, _) = ready(CONFIG);
    let t = Millis(10);
    let mut spent = delivery(1, "A", 1);
    spent.attempts = 3;
    s.ledger_has_more(t);
    let mut out = Vec::new();
    answer_loads(&mut s, t, &mut out, &[spent]);
    assert!(sends(&mut out).is_empty());
    assert!(matches!(
        writes(&mut out)[0].1[0].decision,
        Decision::Dead { .. }
    ));
}

#[test]
fn a_draining_scheduler_starts_nothing_and_reports_when_saved() {
    let (mut s, _) = ready(CONFIG);
    let t = Millis(10);
    s.claimed(t, vec![claim(1, "A", 1, None)]);
    let mut out = drain(&mut s, t);
    let sent = sends(&mut out);
    s.drain(t);
    s.claimed(t, vec![claim(2, "B", 2, None)]);
    assert!(!s.is_drained());
    finish(&mut s, t, sent[0].0, OK);
    let mut out = drain(&mut s, t);
    assert!(sends(&mut out).is_empty());
    s.outcomes_saved(t, writes(&mut out)[0].0);
    assert!(s.is_drained());
}

/// A claim made before a page was taken in may describe a delivery that page brought in and
/// that is finished by now: it goes through the ledger instead.
#[test]
fn a_claim_older_than_the_last_page_is_not_trusted() {
    let (mut s, _) = ready(CONFIG);
    let t = Millis(10);
    s.ledger_has_more(t);
    let mut out = Vec::new();
    answer_loads(&mut s, t, &mut out, &[delivery(1, "A", 1)]);
    let sent = sends(&mut out);
    finish(&mut s, t, sent[0].0, OK);
    save_all(&mut s, t);
    // The claim of 1 (made at 5, before the page at 10) arrives now.
    s.claimed(t, vec![claim(1, "A", 1, None)]);
    let mut out = drain(&mut s, t);
    assert!(sends(&mut out).is_empty(), "delivered once, never again");
}

/// What the scheduler asked for, with broker reads answered and a ledger page left unanswered.
struct Asked {
    sent: Vec<i64>,
    writes: Vec<(IoToken, Vec<Outcome<()>>)>,
    page: Option<IoToken>,
}

fn all_but_the_page(s: &mut Sched, now: Millis) -> Asked {
    let mut asked = Asked {
        sent: Vec::new(),
        writes: Vec::new(),
        page: None,
    };
    while let Some(command) = s.poll_command() {
        match command {
            Command::LoadBroker => s.broker_loaded(now, now, Ok(())),
            Command::LoadPending { token, .. } => asked.page = Some(token),
            Command::Send { delivery_id, .. } => asked.sent.push(delivery_id),
            Command::WriteOutcomes { token, outcomes } => asked.writes.push((token, outcomes)),
            _ => {}
        }
    }
    asked
}

/// Delivery 4 of load A claimed and in flight at 10, then dead letters replayed at 20.
fn a_replay_while_4_of_a_is_in_flight() -> (Sched, AttemptToken) {
    let (mut s, _) = ready(CONFIG);
    let t = Millis(10);
    s.claimed(t, vec![claim(4, "A", 4, None)]);
    let mut out = drain(&mut s, t);
    let in_flight = sends(&mut out);
    s.replayed(Millis(20));
    (s, in_flight[0].0)
}

/// After a replay, a held predecessor does not prove that nothing earlier is pending.
#[test]
fn claims_wait_for_the_sweep_after_a_replay() {
    let (mut s, in_flight) = a_replay_while_4_of_a_is_in_flight();
    let mut fresh = claim(7, "A", 7, Some(4));
    fresh.claimed_at = Millis(30);
    s.claimed(Millis(30), vec![fresh]);
    finish(&mut s, Millis(30), in_flight, OK);
    // The sweep finds the replayed 2 before 7.
    let rows = [delivery(2, "A", 2), delivery(7, "A", 7)];
    let mut sent = Vec::new();
    for _ in 0..5 {
        let mut out = Vec::new();
        answer_loads(&mut s, Millis(30), &mut out, &rows);
        sent.extend(sends(&mut out).into_iter().map(|(_, id)| id));
        for (token, _) in writes(&mut out) {
            s.outcomes_saved(Millis(30), token);
        }
    }
    assert_eq!(sent, vec![2]);
}

/// Simulator seed 43745: a restart keeps a head awaiting its save while the replayed, earlier
/// delivery of its load waits in the ledger; a claim that follows the kept head must still wait
/// for a sweep that reads it (the replay's guard: the sweep before the restart left that load
/// blocked, so it did not read everything).
#[test]
fn claims_wait_for_the_sweep_after_a_restart() {
    // 2 of A was dead and is replayed; the sweep finds it while 4 is in flight and leaves it
    // (and A) in the ledger.
    let (mut s, in_flight) = a_replay_while_4_of_a_is_in_flight();
    let mut out = Vec::new();
    answer_loads(
        &mut s,
        Millis(20),
        &mut out,
        &[delivery(2, "A", 2), delivery(4, "A", 4)],
    );
    assert!(sends(&mut out).is_empty(), "2 waits behind 4");
    finish(&mut s, Millis(20), in_flight, OK);
    let under_way = all_but_the_page(&mut s, Millis(20)).writes;
    s.restarted(Millis(30));
    // The broker row is read again; the sweep's page is not answered yet. Meanwhile 7 is
    // claimed behind 4, and 4 is saved.
    let before_the_claim = all_but_the_page(&mut s, Millis(40));
    let mut fresh = claim(7, "A", 7, Some(4));
    fresh.claimed_at = Millis(40);
    s.claimed(Millis(40), vec![fresh]);
    s.outcomes_saved(Millis(40), under_way[0].0);
    let after_the_save = all_but_the_page(&mut s, Millis(40));
    assert!(
        before_the_claim.page.or(after_the_save.page).is_some(),
        "the restart asks for a sweep"
    );
    assert_eq!(
        [before_the_claim.sent, after_the_save.sent].concat(),
        Vec::<i64>::new(),
        "7 waits: 2, replayed, is still pending"
    );
}

/// Without a replay, a restart leaves nothing earlier than a kept head pending: a claim that
/// follows the head goes out once the head is saved, without waiting for the sweep the restart
/// asked for (session 15 took out the guard that made it wait).
#[test]
fn after_a_restart_without_a_replay_a_claim_follows_the_kept_head() {
    let (mut s, _) = ready(CONFIG);
    s.claimed(Millis(10), vec![claim(4, "A", 4, None)]);
    let mut out = drain(&mut s, Millis(10));
    let in_flight = sends(&mut out);
    finish(&mut s, Millis(10), in_flight[0].0, OK);
    let under_way = all_but_the_page(&mut s, Millis(10)).writes;
    s.restarted(Millis(20));
    let mut fresh = claim(7, "A", 7, Some(4));
    fresh.claimed_at = Millis(30);
    s.claimed(Millis(30), vec![fresh]);
    let before_the_save = all_but_the_page(&mut s, Millis(30));
    assert!(
        before_the_save.page.is_some(),
        "the restart asks for a sweep"
    );
    assert_eq!(
        before_the_save.sent,
        Vec::<i64>::new(),
        "7 waits for 4's save"
    );
    s.outcomes_saved(Millis(30), under_way[0].0);
    let after_the_save = all_but_the_page(&mut s, Millis(30));
    assert_eq!(
        after_the_save.sent,
        vec![7],
        "the sweep's page is not needed"
    );
}

/// 4 of A is answered 400 and decided dead; dead letters are replayed (4 is pending again)
/// before the scheduler hears that the dead outcome was saved. Returns that write's token and
/// the page the replay asked for.
fn a_dead_outcome_raced_by_a_replay(s: &mut Sched) -> (IoToken, IoToken) {
    let t = Millis(10);
    s.claimed(t, vec![claim(4, "A", 4, None)]);
    let mut out = drain(s, t);
    let sent = sends(&mut out);
    let rejected = AttemptResult::Responded {
        status: 400,
        retry_after: None,
    };
    finish(s, t, sent[0].0, rejected);
    let dead = all_but_the_page(s, t).writes;
    assert!(matches!(dead[0].1[0].decision, Decision::Dead { .. }));
    s.replayed(Millis(20));
    let page = all_but_the_page(s, Millis(20))
        .page
        .expect("the replay asks for a sweep");
    (dead[0].0, page)
}

/// The ledger's pending rows of A after the replay: 4 (attempted once) and 7.
fn replayed_4_and_7_of_a() -> [Delivery<()>; 2] {
    let mut replayed = delivery(4, "A", 4);
    replayed.attempts = 1;
    [replayed, delivery(7, "A", 7)]
}

/// What is sent over a few rounds of answering ledger reads with `rows` (requests left out).
fn sent_from_the_ledger(s: &mut Sched, rows: &[Delivery<()>]) -> Vec<i64> {
    let mut sent = Vec::new();
    for _ in 0..5 {
        let mut out = Vec::new();
        answer_loads(s, Millis(30), &mut out, rows);
        sent.extend(sends(&mut out).into_iter().map(|(_, id)| id));
    }
    sent
}

/// Simulator seeds 2, 77 and 108: a delivery's dead outcome commits, dead letters are replayed
/// (it is pending again), and only then does the scheduler hear of the save. Its lane must be
/// read again from the ledger, not move on to the load's next delivery.
#[test]
fn a_replay_racing_a_dead_outcome_reads_the_lane_again() {
    let (mut s, _) = ready(CONFIG);
    let (dead, page) = a_dead_outcome_raced_by_a_replay(&mut s);
    s.outcomes_saved(Millis(20), dead);
    let rows = replayed_4_and_7_of_a();
    s.loaded(Millis(30), page, rows.to_vec());
    assert_eq!(
        sent_from_the_ledger(&mut s, &rows),
        vec![4],
        "4, pending again, goes before 7"
    );
}

/// Simulator seed 70, the same race with the page first: the page after the replay finds the
/// delivery held (its head awaiting the save), so the sweep's mark passes it; the dead outcome's
/// save then takes it out of the lane although the replay made it pending again. The lane's
/// next read must start below it, not after the mark.
#[test]
fn a_replay_racing_a_dead_outcome_reads_the_lane_again_from_below_it() {
    let (mut s, _) = ready(CONFIG);
    let (dead, page) = a_dead_outcome_raced_by_a_replay(&mut s);
    let rows = replayed_4_and_7_of_a();
    s.loaded(Millis(30), page, rows.to_vec());
    assert_eq!(
        s.lanes().held_through(0),
        Some(7),
        "4 (awaiting its save) and 7 held"
    );
    s.outcomes_saved(Millis(30), dead);
    assert_eq!(
        s.lanes().held_through(0),
        Some(3),
        "4 may be pending again: what is known held ends before it"
    );
    assert_eq!(
        sent_from_the_ledger(&mut s, &rows),
        vec![4],
        "4, pending again, goes before 7"
    );
}

/// Simulator seeds 23283 and 25085: after a replay, a claim that follows a held head waits for
/// the sweep even when the head's outcome is saved before the sweep's page comes back (the
/// replay may have made an earlier delivery of the load pending again; only the page says).
#[test]
fn claims_wait_for_the_sweep_after_a_replay_when_the_head_is_saved_first() {
    let (mut s, in_flight) = a_replay_while_4_of_a_is_in_flight();
    let mut fresh = claim(7, "A", 7, Some(4));
    fresh.claimed_at = Millis(30);
    s.claimed(Millis(30), vec![fresh]);
    finish(&mut s, Millis(30), in_flight, OK);
    let asked = all_but_the_page(&mut s, Millis(30));
    s.outcomes_saved(Millis(30), asked.writes[0].0);
    let after_the_save = all_but_the_page(&mut s, Millis(30));
    assert_eq!(
        after_the_save.sent,
        Vec::<i64>::new(),
        "7 waits for the page, which holds the replayed 2"
    );
    let page = asked
        .page
        .or(after_the_save.page)
        .expect("the replay asks for a sweep");
    the_page_sends_the_replayed_2_before_7(&mut s, Millis(40), page);
}

/// Simulator seed 12,979,934: dead letters are replayed while 40 of A is in flight, and the
/// sweep after the replay stops with memory full before it reaches the replayed 20 of A. That
/// sweep is done, but it did not read everything: a claim of 70 of A following the held 40
/// must still go through the ledger, or the lane would send 70 after 40 with 20 pending.
#[test]
fn claims_wait_after_a_replay_until_a_sweep_has_read_everything() {
    let config = SchedulerConfig {
        capacity: 4,
        ..CONFIG
    };
    let (mut s, _) = ready(config);
    s.claimed(Millis(10), vec![claim(40, "A", 40, None)]);
    let mut out = drain(&mut s, Millis(10));
    assert_eq!(sends(&mut out).len(), 1);
    s.replayed(Millis(20));
    let page = all_but_the_page(&mut s, Millis(20))
        .page
        .expect("the replay asks for a sweep");
    // A full page of other loads, and memory is full: the sweep ends before 20 of A.
    s.loaded(
        Millis(25),
        page,
        vec![
            delivery(1, "B", 1),
            delivery(2, "B", 2),
            delivery(3, "B", 3),
            delivery(4, "C", 4),
        ],
    );
    let mut out: Vec<_> = std::iter::from_fn(|| s.poll_command()).collect();
    assert!(
        !out.iter().any(|c| matches!(c, Command::LoadPending { .. })),
        "memory is full: no more pages for now"
    );
    // 1 of B is delivered and saved: room for one more.
    let (b1, _) = sends(&mut out)
        .into_iter()
        .find(|&(_, id)| id == 1)
        .expect("1 of B is sent");
    finish(&mut s, Millis(26), b1, OK);
    let mut out: Vec<_> = std::iter::from_fn(|| s.poll_command()).collect();
    for (token, _) in writes(&mut out) {
        s.outcomes_saved(Millis(27), token);
    }
    assert!(s.held() < 4, "room for the claim");
    let mut fresh = claim(70, "A", 70, Some(40));
    fresh.claimed_at = Millis(30);
    s.claimed(Millis(30), vec![fresh]);
    assert_eq!(
        s.lanes().entries("A").map(|e| e.id).collect::<Vec<_>>(),
        vec![40],
        "70 is not held behind 40 while the replayed 20 may be pending"
    );
}

/// Simulator seeds 608 and 1295: a claim sent to the ledger before a replay committed may say
/// its load has no pending predecessor while the replay just made one pending again. Such a
/// claim goes through the ledger, whose page puts the replayed delivery first.
#[test]
fn a_claim_older_than_a_replay_is_not_trusted() {
    let (mut s, _) = ready(CONFIG);
    s.replayed(Millis(20));
    let asked = all_but_the_page(&mut s, Millis(20));
    // Claimed at 15 (before the replay of 2 committed), answered at 25.
    let mut early = claim(7, "A", 7, None);
    early.claimed_at = Millis(15);
    s.claimed(Millis(25), vec![early]);
    assert_eq!(all_but_the_page(&mut s, Millis(25)).sent, Vec::<i64>::new());
    let page = asked.page.expect("the replay asks for a sweep");
    the_page_sends_the_replayed_2_before_7(&mut s, Millis(30), page);
}

/// The sweep's page holds 2 of A (replayed) and 7 of A: 2 goes first, 7 waits behind it.
/// Simulator seed 201157: dead letters are replayed while 4 of A is in flight, and the
/// sweep's page shows the replayed 2 of A, earlier than 4. It cannot go in front of a head
/// already sent, and behind it would be out of order: it stays in the ledger. 4 fails and
/// waits for its retry; once that is saved, the lane is read again and 2 goes first.
#[test]
fn a_replayed_delivery_earlier_than_a_head_in_flight_waits_and_goes_first() {
    let (mut s, in_flight) = a_replay_while_4_of_a_is_in_flight();
    let page = all_but_the_page(&mut s, Millis(20))
        .page
        .expect("the replay asks for a sweep");
    let mut retry_of_4 = delivery(4, "A", 4);
    retry_of_4.attempts = 1;
    s.loaded(
        Millis(25),
        page,
        vec![delivery(2, "A", 2), retry_of_4.clone()],
    );
    assert_eq!(
        s.lanes().entries("A").map(|e| e.id).collect::<Vec<_>>(),
        vec![4],
        "2 is not held behind the head in flight"
    );
    let unavailable = AttemptResult::Responded {
        status: 503,
        retry_after: None,
    };
    finish(&mut s, Millis(30), in_flight, unavailable);
    let decided = all_but_the_page(&mut s, Millis(30));
    assert!(matches!(
        decided.writes[0].1[0].decision,
        Decision::RetryIn(_)
    ));
    s.outcomes_saved(Millis(30), decided.writes[0].0);
    // The ledger now has 2 ready and 4 waiting for its retry.
    retry_of_4.due_in = Duration::from_secs(60);
    let rows = [delivery(2, "A", 2), retry_of_4];
    let mut out = Vec::new();
    answer_loads(&mut s, Millis(40), &mut out, &rows);
    assert_eq!(
        sends(&mut out)
            .into_iter()
            .map(|(_, id)| id)
            .collect::<Vec<_>>(),
        vec![2]
    );
    assert_eq!(
        s.lanes().entries("A").map(|e| e.id).collect::<Vec<_>>(),
        vec![2, 4],
        "read again in order"
    );
}

fn the_page_sends_the_replayed_2_before_7(s: &mut Sched, now: Millis, page: IoToken) {
    s.loaded(now, page, vec![delivery(2, "A", 2), delivery(7, "A", 7)]);
    assert_eq!(all_but_the_page(s, now).sent, vec![2]);
}

/// Simulator seeds 728 and 791 (first found by 295 and 1715): a sweep's page evicts a waiting retry's whole lane to make room
/// for a ready load; a later row of the evicted load in the same page is not taken (it would
/// go before the evicted retry, which is still pending in the ledger).
#[test]
fn a_load_evicted_by_a_page_is_not_taken_back_by_it() {
    let (mut s, _) = ready(SchedulerConfig {
        capacity: 2,
        breaker: BreakerConfig {
            failure_threshold: 100,
            ..CONFIG.breaker
        },
        ..CONFIG
    });
    let t = Millis(10);
    s.claimed(t, vec![claim(1, "V", 1, None), claim(2, "W", 2, None)]);
    let mut out = drain(&mut s, t);
    for (token, _) in sends(&mut out) {
        s.attempt_finished(t, token, AttemptResult::TransportFailed, 0.5, ());
    }
    save_all(&mut s, t);
    assert_eq!(
        s.held(),
        2,
        "V and W wait for their retries: memory is full"
    );
    // The page: V and W (held, retries due later), then the ready H, then W's next delivery.
    let retry = |mut row: Delivery<()>| {
        row.attempts = 1;
        row.due_in = Duration::from_secs(30);
        row
    };
    let rows = [
        retry(delivery(1, "V", 1)),
        retry(delivery(2, "W", 2)),
        delivery(3, "H", 3),
        delivery(4, "W", 4),
    ];
    s.ledger_has_more(t);
    let mut out = Vec::new();
    answer_loads(&mut s, t, &mut out, &rows);
    assert_eq!(
        sent_ids(&mut out),
        vec![3],
        "H takes W's place; W's 4 stays behind W's 2, back in the ledger"
    );
    assert!(!s.lanes().holds(4));
}

/// Bug 1 as observed: the broker is re-enabled and new events are claimed within the row's
/// refresh period. The claims prove the row changed; they are not dead-lettered on the old read.
#[test]
fn a_claim_after_the_row_was_read_unusable_reads_it_again() {
    let mut s = Sched::new(CONFIG, Millis(0));
    s.lease_gained(Millis(0), 0, 1);
    s.claimed(Millis(0), vec![claim(1, "A", 1, None)]);
    while let Some(c) = s.poll_command() {
        match c {
            Command::LoadBroker => s.broker_loaded(
                Millis(1),
                Millis(1),
                Err(Unusable {
                    class: "invalid_broker",
                    reason: "broker disabled".into(),
                }),
            ),
            Command::LoadPending { token, .. } => s.loaded(Millis(1), token, Vec::new()),
            _ => {}
        }
    }
    let t = Millis(100);
    let mut fresh = claim(2, "B", 2, None);
    fresh.claimed_at = Millis(50);
    s.claimed(t, vec![fresh]);
    let mut reads = 0;
    let mut out = Vec::new();
    while let Some(c) = s.poll_command() {
        match c {
            Command::LoadBroker => {
                reads += 1;
                s.broker_loaded(t, t, Ok(()));
            }
            Command::LoadPending { token, .. } => s.loaded(t, token, Vec::new()),
            other => out.push(other),
        }
    }
    assert_eq!(reads, 1, "the row is read again");
    assert_eq!(sent_ids(&mut out), vec![2]);
}

/// A failed ledger read is retried after a pause, not at once: a database outage must not turn
/// into a hot loop of failing reads.
#[test]
fn a_failed_ledger_read_waits_before_the_next() {
    let mut s = Sched::new(CONFIG, Millis(0));
    s.lease_gained(Millis(0), 0, 1);
    let load_token = |s: &mut Sched| {
        let mut token = None;
        while let Some(command) = s.poll_command() {
            if let Command::LoadPending { token: t, .. } = command {
                token = Some(t);
            }
        }
        token
    };
    let first = load_token(&mut s).expect("a new scheduler reads the ledger");
    s.load_failed(Millis(10), first);
    assert_eq!(load_token(&mut s), None, "no read straight after a failure");
    s.ledger_has_more(Millis(20));
    assert_eq!(load_token(&mut s), None, "a nudge does not skip the pause");
    let retry_at = Millis(10) + RETRY_IO_AFTER;
    assert_eq!(s.next_wakeup(Millis(20)), Some(retry_at));
    s.tick(retry_at);
    let second = load_token(&mut s).expect("read again once the pause is over");
    s.loaded(retry_at, second, Vec::new());
    assert_eq!(load_token(&mut s), None);
    assert_eq!(s.next_wakeup(retry_at), None);
}

/// The shell pushes rows it read for every broker; a read that started before a known change
/// (a claim proves the broker was re-enabled) is not trusted, and one older than a 410 Gone
/// does not undo it.
#[test]
fn a_pushed_row_older_than_what_is_known_is_not_trusted() {
    let mut s = Sched::new(CONFIG, Millis(0));
    s.lease_gained(Millis(0), 0, 1);
    let disabled = || {
        Err(Unusable {
            class: "broker_disabled",
            reason: "broker disabled".into(),
        })
    };
    s.broker_loaded(Millis(1), Millis(1), disabled());
    // Re-enabled at 40; a claim sent at 50 proves it.
    let mut fresh = claim(2, "B", 2, None);
    fresh.claimed_at = Millis(50);
    s.claimed(Millis(60), vec![fresh]);
    // A push of a read started at 45 (before the claim) arrives: the delivery is not
    // dead-lettered on it, and the row is asked for again.
    s.broker_loaded(Millis(70), Millis(45), disabled());
    let mut out = Vec::new();
    let mut asked = 0;
    while let Some(c) = s.poll_command() {
        match c {
            Command::LoadBroker => asked += 1,
            Command::LoadPending { token, .. } => s.loaded(Millis(70), token, Vec::new()),
            other => out.push(other),
        }
    }
    assert!(asked >= 1, "the row is read again");
    assert!(
        !out.iter().any(|c| matches!(c, Command::Decided { .. })),
        "nothing is decided on the stale row"
    );
    // The fresh read: sent.
    s.broker_loaded(Millis(80), Millis(75), Ok(()));
    let mut out = drain(&mut s, Millis(80));
    let sent = sends(&mut out);
    assert_eq!(sent.iter().map(|(_, id)| *id).collect::<Vec<_>>(), vec![2]);
    // 410 Gone at 90: a push of a read started before it does not make the broker usable.
    finish(
        &mut s,
        Millis(90),
        sent[0].0,
        AttemptResult::Responded {
            status: 410,
            retry_after: None,
        },
    );
    s.broker_loaded(Millis(95), Millis(85), Ok(()));
    assert!(!s.endpoint_usable());
}

/// Idle means a fresh scheduler would do the same: nothing held, out, unsaved or wanted.
#[test]
fn idle_only_when_nothing_is_held_out_unsaved_or_wanted() {
    let (mut s, _) = ready(CONFIG);
    assert!(s.is_idle(), "a scheduler that read an empty ledger");
    let t = Millis(10);
    s.claimed(t, vec![claim(1, "A", 1, None)]);
    assert!(!s.is_idle(), "holds a delivery");
    let mut out = drain(&mut s, t);
    let sent = sends(&mut out);
    assert!(!s.is_idle(), "a request is out");
    finish(&mut s, t, sent[0].0, OK);
    assert!(!s.is_idle(), "the outcome is not saved");
    let mut out = drain(&mut s, t);
    s.outcomes_saved(t, writes(&mut out)[0].0);
    assert!(s.is_idle(), "delivered and saved");
    s.ledger_has_more(t);
    assert!(!s.is_idle(), "the ledger is to be read");
    drain(&mut s, t);
    assert!(s.is_idle());
}

/// A pending retry or a breaker that counted a failure keeps the scheduler (and its actor).
#[test]
fn a_retry_or_a_counted_failure_is_not_idle() {
    let (mut s, _) = ready(CONFIG);
    let t = Millis(10);
    s.claimed(t, vec![claim(1, "A", 1, None)]);
    let mut out = drain(&mut s, t);
    finish(&mut s, t, sends(&mut out)[0].0, FAILED);
    save_all(&mut s, t);
    assert_eq!(s.held(), 1, "the retry waits in memory");
    assert!(!s.is_idle(), "a retry is pending");

    let (mut s, _) = ready(SchedulerConfig {
        retry: RetryPolicy {
            max_attempts: 1,
            ..CONFIG.retry
        },
        ..CONFIG
    });
    s.claimed(t, vec![claim(1, "A", 1, None)]);
    let mut out = drain(&mut s, t);
    finish(&mut s, t, sends(&mut out)[0].0, FAILED);
    save_all(&mut s, t);
    assert_eq!(s.held(), 0, "dead after its only attempt");
    assert_eq!(s.breaker().consecutive_failures(), 1);
    assert!(!s.is_idle(), "the breaker counted a failure");
    s.claimed(t, vec![claim(2, "B", 2, None)]);
    let mut out = drain(&mut s, t);
    finish(&mut s, t, sends(&mut out)[0].0, OK);
    save_all(&mut s, t);
    assert!(s.is_idle(), "a success reset the count");
}

/// A deep load in one partition does not fill memory while the broker's loads in other
/// partitions wait (the `hotload` benchmark: one page in (partition, offset) order held only
/// the lowest partition's load, and the other lanes idled).
#[test]
fn a_page_shares_memory_among_partitions() {
    let mut s = Sched::new(CONFIG, Millis(0));
    for partition in 0..3 {
        s.lease_gained(Millis(0), partition, 1);
    }
    let in_partition = |partition: i32, load: &str, ids: std::ops::Range<i64>| {
        ids.map(move |id| Delivery {
            partition,
            ..delivery(id, load, id)
        })
        .collect::<Vec<_>>()
    };
    let mut rows = in_partition(0, "deep", 0..1_000);
    rows.extend(in_partition(1, "B", 1_000..1_005));
    rows.extend(in_partition(2, "C", 2_000..2_005));
    let mut out = Vec::new();
    answer_loads(&mut s, Millis(0), &mut out, &rows);
    assert_eq!(
        sent_ids(&mut out),
        vec![0, 1_000, 2_000],
        "every load's first delivery goes out at once"
    );
    for load in ["deep", "B", "C"] {
        assert!(
            s.lanes()
                .loads()
                .any(|(held, _, len)| held == load && len >= 2),
            "{load} holds a share of memory"
        );
    }
}

/// The claim's fast path: the first load claimed does not keep all of memory while another
/// load's deliveries wait for a sweep; the longest lane gives up its last places, and what it
/// gave up is no longer treated as held.
#[test]
fn a_claimed_load_takes_its_fair_share_of_a_full_memory() {
    let (mut s, _) = ready(SchedulerConfig {
        max_in_flight: 1,
        ..CONFIG
    });
    let t = Millis(10);
    let deep: Vec<_> = (0..10)
        .map(|i| claim(i, "A", i, (i > 0).then(|| i - 1)))
        .collect();
    s.claimed(t, deep);
    assert_eq!(s.held(), 10, "memory is full of A");
    let shallow: Vec<_> = (100..103)
        .map(|i| claim(i, "B", i, (i > 100).then(|| i - 1)))
        .collect();
    s.claimed(t, shallow);
    assert_eq!(s.held(), 10);
    assert_eq!(s.lanes().lane_len("B"), 3, "B got places");
    assert_eq!(s.lanes().lane_len("A"), 7, "A gave up its last three");
    // A's next delivery follows one it gave up: it waits in the ledger for the sweep.
    s.claimed(t, vec![claim(10, "A", 10, Some(9))]);
    assert!(!s.lanes().holds(10));
}

/// Sends and saves everything (every request answered 200), answering ledger reads from
/// `ledger`, whose rows leave it as their outcomes are saved. Returns the ids sent, in order,
/// and every page asked for: its cursors and how many rows it returned.
fn deliver_all(
    s: &mut Sched,
    now: Millis,
    ledger: &mut Vec<Delivery<()>>,
) -> (Vec<i64>, Vec<(Vec<PartitionCursor>, usize)>) {
    let (mut sent, mut pages) = (Vec::new(), Vec::new());
    for _ in 0..10_000 {
        let mut progressed = false;
        while let Some(command) = s.poll_command() {
            progressed = true;
            match command {
                Command::LoadBroker => s.broker_loaded(now, now, Ok(())),
                Command::LoadPending {
                    token,
                    cursors,
                    per_partition,
                } => {
                    let rows = page(ledger, &cursors, per_partition);
                    pages.push((cursors, rows.len()));
                    s.loaded(now, token, rows);
                }
                Command::Send {
                    token, delivery_id, ..
                } => {
                    sent.push(delivery_id);
                    finish(s, now, token, OK);
                }
                Command::WriteOutcomes { token, outcomes } => {
                    ledger.retain(|row| !outcomes.iter().any(|o| o.delivery_id == row.id));
                    s.outcomes_saved(now, token);
                }
                _ => {}
            }
        }
        if !progressed {
            break;
        }
    }
    (sent, pages)
}

/// A sweep starts when half the memory is free. It used to read from the start of every
/// partition, the half still held included, and to ask for a whole memory's worth of rows
/// when half of it fitted: about three rows read per delivery on a deep load (`hotload`,
/// docs/performance.md "Session 16"). It now starts after the rows it holds and asks for what
/// fits, so each pending row is read once, in order.
#[test]
fn a_sweep_reads_each_pending_row_once() {
    let (mut s, _) = ready(CONFIG);
    let mut ledger: Vec<_> = (0..40).map(|i| delivery(i, "deep", i)).collect();
    s.ledger_has_more(Millis(1));
    let (sent, pages) = deliver_all(&mut s, Millis(1), &mut ledger);
    assert_eq!(
        sent,
        (0..40).collect::<Vec<_>>(),
        "every delivery, in order"
    );
    let rows_read: usize = pages.iter().map(|(_, rows)| rows).sum();
    assert_eq!(rows_read, 40, "each row read once: {pages:?}");
    assert!(ledger.is_empty());
}

/// What a sweep skips must really be held: rows given back (a retry evicted for a ready load)
/// are read again, and after a replay every partition is read from the start.
#[test]
fn a_sweep_reads_again_what_was_given_back_or_replayed() {
    let (mut s, _) = ready(SchedulerConfig {
        max_in_flight: 1,
        ..CONFIG
    });
    let t = Millis(1);
    let mut ledger: Vec<_> = (0..10).map(|i| delivery(i, "deep", i)).collect();
    s.ledger_has_more(t);
    let mut out = Vec::new();
    answer_loads(&mut s, t, &mut out, &ledger);
    assert_eq!(s.lanes().held_through(0), Some(9), "0 to 9 are held");
    // Memory is full. The head fails and waits for its retry; a ready load's row takes the
    // place of the lane's last delivery, which goes back to the ledger.
    let (token, first) = sends(&mut out)[0];
    assert_eq!(first, 0);
    finish(&mut s, t, token, FAILED);
    save_all(&mut s, t);
    ledger.push(Delivery {
        partition: 1,
        ..delivery(100, "ready", 0)
    });
    s.lease_gained(t, 1, 1);
    let mut out = Vec::new();
    answer_loads(&mut s, t, &mut out, &ledger);
    assert!(s.lanes().holds(100), "the ready load got a place");
    assert!(
        !s.lanes().holds(9),
        "the waiting lane gave up its last delivery"
    );
    assert_eq!(
        s.lanes().held_through(0),
        Some(8),
        "what is held ends before it"
    );
    // A replay: rows earlier than anything held may be pending again.
    s.replayed(t);
    let asked = loop {
        match s.poll_command() {
            Some(Command::LoadPending { cursors, .. }) => break cursors,
            Some(_) => {}
            None => panic!("a replay reads the ledger"),
        }
    };
    assert!(
        asked.iter().all(|cursor| cursor.after.is_none()),
        "after a replay every partition is read from the start: {asked:?}"
    );
}

/// Simulator seeds 427 and 813: while a sweep reads a partition, a ready row of a new load
/// takes the place of a waiting lane's last delivery in the same partition, below the held
/// mark. The mark comes down below that delivery and must not go up again in this sweep, or
/// the next sweep would start after a pending row nobody holds.
#[test]
fn a_row_given_back_during_a_sweep_stays_below_the_held_mark() {
    let (mut s, _) = ready(SchedulerConfig {
        capacity: 3,
        max_in_flight: 1,
        ..CONFIG
    });
    let t = Millis(10);
    s.claimed(t, vec![claim(0, "W", 0, None)]);
    let mut out = drain(&mut s, t);
    let (token, _) = sends(&mut out)[0];
    finish(&mut s, t, token, FAILED);
    save_all(&mut s, t);
    let mut waiting = delivery(0, "W", 0);
    waiting.attempts = 1;
    waiting.due_in = Duration::from_secs(30);
    let ledger = [
        waiting,
        delivery(1, "W", 1),
        delivery(2, "W", 2),
        delivery(3, "N", 3),
    ];
    s.ledger_has_more(t);
    let mut out = Vec::new();
    answer_loads(&mut s, t, &mut out, &ledger);
    assert!(s.lanes().holds(3), "N's ready row got a place");
    assert!(!s.lanes().holds(2), "W's last delivery gave it up");
    assert_eq!(
        s.lanes().held_through(0),
        Some(1),
        "the next sweep reads 2 again"
    );
}

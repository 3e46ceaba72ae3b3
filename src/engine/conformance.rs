//! Engine conformance tests, written once and run against every engine (NATS runs its store
//! tests against both `memstore` and `filestore` the same way). Each case is a function of an
//! engine constructor; `conformance!` instantiates all of them for one engine. A new engine
//! adds one `conformance!(name, constructor)` line at the bottom.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;

use super::{AckPolicy, Engine, FanoutCursor, GroupSettings, Log, Settle, StartAt};
use crate::{config::Limits, error::BrokerError, metrics::Metrics, validate::Address};

type Make = fn(&Limits) -> Engine;

fn limits(retention_messages: usize) -> Limits {
    Limits {
        retention_messages,
        ..Limits::default()
    }
}

fn addr(name: &str) -> Address {
    Address::parse(name).unwrap()
}

fn append_n(e: &Engine, a: &Address, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            let payload = Bytes::from(format!("m{i}"));
            let size = payload.len() + 128;
            let (appended, durable) = e
                .append(a, payload, Default::default(), size, None)
                .unwrap();
            durable.wait_blocking().unwrap();
            appended.sequence
        })
        .collect()
}

/// Reads a fan-out cursor until nothing more is there: (dropped in all, sequences read).
fn drain(log: &Log, cursor: &mut FanoutCursor) -> (u64, Vec<u64>) {
    let mut out = VecDeque::new();
    let mut dropped = 0;
    loop {
        let before = out.len();
        dropped += log.read_fanout(cursor, (7, usize::MAX), &mut out);
        if out.len() == before {
            break;
        }
    }
    (dropped, out.iter().map(|(m, _)| m.sequence).collect())
}

/// CreateGroup, once durable.
fn create_group(
    e: &Engine,
    a: &Address,
    group: &str,
    settings: GroupSettings,
) -> Result<(bool, u64), BrokerError> {
    let (created, next, durable) = e.create_group(a, group, settings)?;
    durable.wait_blocking()?;
    Ok((created, next))
}

fn at(start: StartAt) -> GroupSettings {
    GroupSettings { start, ack: None }
}

fn seqs(from: u64, to: u64) -> Vec<u64> {
    (from..=to).collect()
}

fn no_limit() -> BrokerError {
    unreachable!("no subscriber limit in these tests")
}

pub(super) fn history_survives_consumption(make: Make) {
    let e = make(&limits(100));
    let a = addr("c.history");
    assert_eq!(append_n(&e, &a, 5), seqs(1, 5));
    let (_, _, batch) = e.take(&a, "", 10, usize::MAX, false).unwrap();
    assert_eq!(batch.messages.len(), 5);
    assert_eq!(e.counts("c.history")[2], 5, "taken messages stay retained");
    let (created, next) = create_group(&e, &a, "late", at(StartAt::Sequence(1))).unwrap();
    assert!(created);
    assert_eq!(next, 1);
    let (_, _, batch) = e.take(&a, "late", 100, usize::MAX, false).unwrap();
    let got: Vec<u64> = batch.messages.iter().map(|m| m.message.sequence).collect();
    assert_eq!(got, seqs(1, 5), "a group created at 1 takes all history");
    assert_eq!(batch.dropped, 0);
}

pub(super) fn replay_inside_window(make: Make) {
    let e = make(&limits(10));
    let a = addr("c.inside");
    append_n(&e, &a, 20);
    let (log, mut cursor) = e
        .subscribe_fanout(&a, StartAt::Sequence(15), 10, no_limit)
        .unwrap();
    assert_eq!(drain(&log, &mut cursor), (0, seqs(15, 20)));
    append_n(&e, &a, 2);
    assert_eq!(
        drain(&log, &mut cursor),
        (0, seqs(21, 22)),
        "live after replay"
    );
    log.unsubscribe_fanout(cursor);
}

pub(super) fn replay_before_window_reports_exact_dropped(make: Make) {
    let e = make(&limits(10));
    let a = addr("c.before");
    append_n(&e, &a, 20);
    let (log, mut cursor) = e
        .subscribe_fanout(&a, StartAt::Sequence(3), 10, no_limit)
        .unwrap();
    // 3..=10 are gone: exactly 8, then the oldest retained (11).
    assert_eq!(drain(&log, &mut cursor), (8, seqs(11, 20)));
    log.unsubscribe_fanout(cursor);
}

pub(super) fn start_at_last_plus_one_is_live(make: Make) {
    let e = make(&limits(10));
    let a = addr("c.next");
    append_n(&e, &a, 20);
    let (log, mut cursor) = e
        .subscribe_fanout(&a, StartAt::Sequence(21), 10, no_limit)
        .unwrap();
    assert_eq!(drain(&log, &mut cursor), (0, vec![]));
    append_n(&e, &a, 1);
    assert_eq!(drain(&log, &mut cursor), (0, vec![21]));
    log.unsubscribe_fanout(cursor);
}

pub(super) fn start_past_end_is_refused(make: Make) {
    let e = make(&limits(10));
    let a = addr("c.past");
    append_n(&e, &a, 20);
    let err = e
        .subscribe_fanout(&a, StartAt::Sequence(22), 10, no_limit)
        .unwrap_err();
    assert_eq!(
        err,
        BrokerError::PastEnd {
            field: "start_sequence",
            requested: 22,
            last: 20
        }
    );
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    assert!(err.to_string().contains("22") && err.to_string().contains("20"));
    assert_eq!(e.counts("c.past")[0], 0, "nothing registered");
    assert!(matches!(
        create_group(&e, &a, "g", at(StartAt::Sequence(22))),
        Err(BrokerError::PastEnd { .. })
    ));
}

pub(super) fn start_at_time(make: Make) {
    let e = make(&limits(100));
    let a = addr("c.time");
    append_n(&e, &a, 3);
    // Wall-clock steps between the batches, so that sent_at tells them apart.
    std::thread::sleep(Duration::from_millis(5));
    let t = SystemTime::now();
    std::thread::sleep(Duration::from_millis(5));
    append_n(&e, &a, 3);
    let (log, mut cursor) = e
        .subscribe_fanout(&a, StartAt::Time(t), 10, no_limit)
        .unwrap();
    assert_eq!(drain(&log, &mut cursor), (0, seqs(4, 6)));
    log.unsubscribe_fanout(cursor);
    let (_, next) = create_group(&e, &a, "since", at(StartAt::Time(t))).unwrap();
    assert_eq!(next, 4);
    // A time after every message: live.
    let later = SystemTime::now() + Duration::from_secs(3600);
    let (log, mut cursor) = e
        .subscribe_fanout(&a, StartAt::Time(later), 10, no_limit)
        .unwrap();
    assert_eq!(drain(&log, &mut cursor), (0, vec![]));
    log.unsubscribe_fanout(cursor);
}

pub(super) fn create_group_is_idempotent(make: Make) {
    let e = make(&limits(100));
    let a = addr("c.create");
    append_n(&e, &a, 10);
    assert_eq!(
        create_group(&e, &a, "g", at(StartAt::Sequence(4))).unwrap(),
        (true, 4)
    );
    assert_eq!(
        create_group(&e, &a, "g", at(StartAt::Sequence(4))).unwrap(),
        (false, 4)
    );
    let err = create_group(&e, &a, "g", at(StartAt::Sequence(5))).unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert!(err.to_string().contains("start_sequence 4"), "{err}");
    let (_, _, batch) = e.take(&a, "g", 3, usize::MAX, false).unwrap();
    assert_eq!(batch.messages[0].message.sequence, 4);
    // The same request after reads: still OK, and reports the group's position now.
    assert_eq!(
        create_group(&e, &a, "g", at(StartAt::Sequence(4))).unwrap(),
        (false, 7)
    );
    // A group created by its first read started at the end.
    e.take(&a, "implicit", 1, usize::MAX, false).unwrap();
    assert_eq!(
        create_group(&e, &a, "implicit", at(StartAt::End)).unwrap(),
        (false, 11)
    );
    assert!(create_group(&e, &a, "implicit", at(StartAt::Sequence(1))).is_err());
}

pub(super) fn delete_group_ends_its_readers(make: Make) {
    let e = make(&limits(100));
    let a = addr("c.delete");
    append_n(&e, &a, 4);
    create_group(&e, &a, "g", at(StartAt::Sequence(1))).unwrap();
    let (log, id, batch) = e.take(&a, "g", 1, usize::MAX, false).unwrap();
    assert_eq!(batch.messages.len(), 1);
    e.delete_group("c.delete", "g")
        .unwrap()
        .wait_blocking()
        .unwrap();
    assert_eq!(
        log.take("g", id, 1, usize::MAX, 0).unwrap_err(),
        BrokerError::GroupDeleted
    );
    // Created again: a new incarnation; the old id still sees it deleted.
    create_group(&e, &a, "g", at(StartAt::Sequence(1))).unwrap();
    assert_eq!(
        log.take("g", id, 1, usize::MAX, 0).unwrap_err(),
        BrokerError::GroupDeleted
    );
    let (_, _, batch) = e.take(&a, "g", 10, usize::MAX, false).unwrap();
    assert_eq!(batch.messages.len(), 4, "the new group starts afresh at 1");
    assert!(matches!(
        e.delete_group("c.delete", "nope"),
        Err(BrokerError::NoSuchGroup { .. })
    ));
    assert!(matches!(
        e.delete_group("c.unknown", "g"),
        Err(BrokerError::NoSuchAddress(_))
    ));
}

pub(super) fn count_retention_reports_exact_loss_to_groups(make: Make) {
    let e = make(&limits(5));
    let a = addr("c.count");
    append_n(&e, &a, 12);
    let (_, _, batch) = e.take(&a, "", 100, usize::MAX, false).unwrap();
    assert_eq!(batch.dropped, 7);
    let got: Vec<u64> = batch.messages.iter().map(|m| m.message.sequence).collect();
    assert_eq!(got, seqs(8, 12));
}

pub(super) async fn age_retention_evicts_with_exact_dropped(make: Make) {
    tokio::time::pause();
    let e = make(&Limits {
        retention_age: Duration::from_secs(10),
        ..Limits::default()
    });
    let a = addr("c.age");
    append_n(&e, &a, 3);
    let (log, mut cursor) = e
        .subscribe_fanout(&a, StartAt::Sequence(1), 10, no_limit)
        .unwrap();
    tokio::time::advance(Duration::from_secs(6)).await;
    append_n(&e, &a, 1);
    tokio::time::advance(Duration::from_secs(5)).await;
    // 1..=3 are 11 s old, 4 is 5 s old: the sweep evicts exactly three.
    assert_eq!(e.maintain().aged, 3);
    assert_eq!(e.counts("c.age")[2], 1);
    assert_eq!(drain(&log, &mut cursor), (3, vec![4]));
    let (_, _, batch) = e.take(&a, "", 10, usize::MAX, false).unwrap();
    assert_eq!((batch.dropped, batch.messages.len()), (3, 1));
    log.unsubscribe_fanout(cursor);
    // Without a sweep, reading evicts what has expired too.
    tokio::time::advance(Duration::from_secs(10)).await;
    let (log, mut cursor) = e
        .subscribe_fanout(&a, StartAt::Sequence(4), 10, no_limit)
        .unwrap();
    assert_eq!(drain(&log, &mut cursor), (1, vec![]));
    log.unsubscribe_fanout(cursor);
}

fn acked(ack_wait: Duration, max_deliveries: u32, dead_letter: Option<&str>) -> GroupSettings {
    GroupSettings {
        start: StartAt::Sequence(1),
        ack: Some(AckPolicy {
            ack_wait,
            max_deliveries,
            dead_letter: dead_letter.map(addr),
            max_ack_pending: 1000,
        }),
    }
}

fn taken(b: &super::Batch) -> Vec<(u64, u32)> {
    b.messages
        .iter()
        .map(|t| (t.message.sequence, t.attempt))
        .collect()
}

pub(super) async fn lease_expiry_redelivers_then_dead_letters(make: Make) {
    tokio::time::pause();
    let e = make(&limits(100));
    let a = addr("c.lease");
    append_n(&e, &a, 2);
    create_group(
        &e,
        &a,
        "w",
        acked(Duration::from_secs(10), 2, Some("c.dlq")),
    )
    .unwrap();
    let (log, id, b) = e.take(&a, "w", 10, usize::MAX, false).unwrap();
    assert_eq!(taken(&b), vec![(1, 1), (2, 1)]);
    assert!(b.next_due.is_some(), "a reader knows when to wake");
    e.settle("c.lease", "w", &[2], Settle::Ack).unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    let b = log.take("w", id, 10, usize::MAX, 0).unwrap();
    assert_eq!(taken(&b), vec![(1, 2)], "expired, redelivered; 2 was acked");
    tokio::time::advance(Duration::from_secs(10)).await;
    // Nobody reads again: the sweep dead-letters the message on its last delivery.
    let m = e.maintain();
    assert_eq!(m.dead_letters.len(), 1);
    let d = &m.dead_letters[0];
    assert_eq!((d.message.sequence, d.deliveries), (1, 2));
    assert_eq!((d.group.as_str(), d.to.as_str()), ("w", "c.dlq"));
    let g = e.address_info("c.lease", true).unwrap().1;
    let g = g.iter().find(|g| g.group == "w").unwrap();
    assert_eq!((g.pending, g.redelivered, g.dead_lettered), (0, 1, 1));
    let s = e.settle("c.lease", "w", &[1, 2], Settle::Ack).unwrap();
    assert_eq!(s.not_pending, vec![1, 2]);
}

pub(super) async fn released_leases_go_out_at_once(make: Make) {
    tokio::time::pause();
    let e = make(&limits(100));
    let a = addr("c.release");
    append_n(&e, &a, 3);
    create_group(&e, &a, "w", acked(Duration::from_secs(600), 0, None)).unwrap();
    let (log, id) = e.subscribe_group(&a, "w", 10, no_limit).unwrap();
    let b = log.take("w", id, 2, usize::MAX, 42).unwrap();
    assert_eq!(taken(&b), vec![(1, 1), (2, 1)]);
    log.release("w", id, 42);
    log.unsubscribe_group();
    let (_, _, b) = e.take(&a, "w", 10, usize::MAX, false).unwrap();
    assert_eq!(
        taken(&b),
        vec![(1, 2), (2, 2), (3, 1)],
        "redeliveries first"
    );
}

pub(super) fn evicted_pending_messages_are_reported_dropped(make: Make) {
    let e = make(&limits(3));
    let a = addr("c.evictpending");
    append_n(&e, &a, 3);
    create_group(&e, &a, "w", acked(Duration::from_secs(600), 0, None)).unwrap();
    let (_, _, b) = e.take(&a, "w", 2, usize::MAX, false).unwrap();
    assert_eq!(taken(&b), vec![(1, 1), (2, 1)]);
    append_n(&e, &a, 3);
    // 1 and 2 (pending) and 3 (never taken) were evicted: exactly 3 lost.
    let (_, _, b) = e.take(&a, "w", 10, usize::MAX, false).unwrap();
    assert_eq!(b.dropped, 3);
    assert_eq!(taken(&b), vec![(4, 1), (5, 1), (6, 1)]);
    let s = e.settle("c.evictpending", "w", &[1], Settle::Ack).unwrap();
    assert_eq!(s.not_pending, vec![1]);
}

macro_rules! conformance {
    ($engine:ident, $make:expr) => {
        mod $engine {
            use super::*;

            const MAKE: Make = $make;

            #[test]
            fn history_survives_consumption() {
                super::history_survives_consumption(MAKE);
            }
            #[test]
            fn replay_inside_window() {
                super::replay_inside_window(MAKE);
            }
            #[test]
            fn replay_before_window_reports_exact_dropped() {
                super::replay_before_window_reports_exact_dropped(MAKE);
            }
            #[test]
            fn start_at_last_plus_one_is_live() {
                super::start_at_last_plus_one_is_live(MAKE);
            }
            #[test]
            fn start_past_end_is_refused() {
                super::start_past_end_is_refused(MAKE);
            }
            #[test]
            fn start_at_time() {
                super::start_at_time(MAKE);
            }
            #[test]
            fn create_group_is_idempotent() {
                super::create_group_is_idempotent(MAKE);
            }
            #[test]
            fn delete_group_ends_its_readers() {
                super::delete_group_ends_its_readers(MAKE);
            }
            #[test]
            fn count_retention_reports_exact_loss_to_groups() {
                super::count_retention_reports_exact_loss_to_groups(MAKE);
            }
            #[tokio::test(flavor = "current_thread")]
            async fn age_retention_evicts_with_exact_dropped() {
                super::age_retention_evicts_with_exact_dropped(MAKE).await;
            }
            #[tokio::test(flavor = "current_thread")]
            async fn lease_expiry_redelivers_then_dead_letters() {
                super::lease_expiry_redelivers_then_dead_letters(MAKE).await;
            }
            #[tokio::test(flavor = "current_thread")]
            async fn released_leases_go_out_at_once() {
                super::released_leases_go_out_at_once(MAKE).await;
            }
            #[test]
            fn evicted_pending_messages_are_reported_dropped() {
                super::evicted_pending_messages_are_reported_dropped(MAKE);
            }
        }
    };
}

conformance!(memory, |l| Engine::memory(l, Arc::new(Metrics::new())));

conformance!(disk, |l| {
    // Each engine gets a directory of its own; it outlives the test (the engine owns no
    // handle to remove it), under the system's temporary directory.
    let dir = tempfile::Builder::new()
        .prefix("switchboard-conformance-")
        .tempdir()
        .unwrap()
        .keep();
    let config = crate::engine::disk::DiskConfig {
        dir,
        fsync: crate::engine::disk::FsyncMode::Always,
        segment_bytes: crate::engine::disk::DEFAULT_SEGMENT_BYTES,
        repair: false,
        journal_compact_bytes: crate::engine::disk::DEFAULT_JOURNAL_COMPACT_BYTES,
        // Nothing cached: every read goes back to the segments.
        cache_bytes: 0,
    };
    Engine::disk(l, Arc::new(Metrics::new()), &config).unwrap()
});

//! `switchboard-bench --soak SECS` (run by `scripts/soak`): a bounded mixed workload against a
//! broker process, checking what retention promises and printing what an operator would ask.
//!
//! Workload, all at once: two publishers (SendStream to a fan-out address, unary Send to a work
//! queue), four fast fan-out subscribers, one stalled subscriber (reads nothing for the first
//! half, then catches up), two consumer-group workers, address churn (send, take, forget), clients
//! that subscribe and vanish, and a latency probe (unary Send every 20 ms).
//!
//! Checks: fast subscribers and the group lose nothing (lost = 0); the stalled subscriber's
//! messages plus its `Dropped` counts equal what was sent; no subscriber is left open at the end.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use switchboard::pb::{
    admin_client::AdminClient, subscribe_response::Event, ListAddressesRequest, RecvRequest,
    SendRequest, SubscribeRequest,
};

use crate::{client, Res, Server};

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    fn ok(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn err(&self, status: &tonic::Status) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.errors.lock() {
            *e.entry(format!("{:?}", status.code())).or_default() += 1;
        }
    }
}

fn req(address: &str, payload: &[u8]) -> SendRequest {
    SendRequest {
        address: address.into(),
        payload: payload.to_vec().into(),
        headers: Default::default(),
        message_id: String::new(),
    }
}

/// Reads a fan-out stream until `last` (the final sequence, once known) is accounted for or the
/// deadline passes: (messages, dropped, contiguous).
async fn read_fanout(
    mut stream: tonic::Streaming<switchboard::pb::SubscribeResponse>,
    stall_until: Option<Instant>,
    last: Arc<AtomicU64>,
    hard_stop: Instant,
) -> (u64, u64, bool) {
    if let Some(t) = stall_until {
        tokio::time::sleep_until(t.into()).await;
    }
    let (mut messages, mut dropped, mut next, mut contiguous) = (0u64, 0u64, 1u64, true);
    loop {
        let final_seq = last.load(Ordering::Acquire);
        if final_seq > 0 && next > final_seq {
            return (messages, dropped, contiguous);
        }
        let left = hard_stop.saturating_duration_since(Instant::now());
        let Ok(Ok(Some(r))) = tokio::time::timeout(left, stream.message()).await else {
            return (messages, dropped, contiguous);
        };
        match r.event {
            Some(Event::Message(m)) => {
                contiguous &= m.sequence == next;
                next = m.sequence + 1;
                messages += 1;
            }
            Some(Event::Dropped(d)) => {
                dropped += d.count;
                next += d.count;
            }
            None => {}
        }
    }
}

/// Subscribes to the fan-out address (registered when this returns) and spawns its reader.
async fn fanout_reader(
    addr: std::net::SocketAddr,
    stall_until: Option<Instant>,
    last: Arc<AtomicU64>,
    hard_stop: Instant,
) -> Res<tokio::task::JoinHandle<(u64, u64, bool)>> {
    let mut c = client(addr).await?;
    let s = c
        .subscribe(SubscribeRequest {
            address: "soak.fan".into(),
            group: String::new(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(tokio::spawn(async move {
        let _c = c;
        read_fanout(s, stall_until, last, hard_stop).await
    }))
}

pub(crate) async fn run(bin: &std::path::PathBuf, secs: u64) -> Res<bool> {
    let server = Server::broker(bin).await?;
    let addr = server.addr;
    let rss_start = server.mem("VmRSS:")?;
    let stats = Arc::new(Stats::default());
    let start = Instant::now();
    let half = start + Duration::from_secs(secs) / 2;
    let end = start + Duration::from_secs(secs);
    let hard_stop = end + Duration::from_secs(20);
    let fan_last = Arc::new(AtomicU64::new(0));

    // Subscribers first (registered before the publishers start).
    let mut fast = Vec::new();
    for _ in 0..4 {
        fast.push(fanout_reader(addr, None, Arc::clone(&fan_last), hard_stop).await?);
    }
    let stalled = fanout_reader(addr, Some(half), Arc::clone(&fan_last), hard_stop).await?;
    let mut admin = AdminClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?,
    );
    {
        let mut c = client(addr).await?;
        c.recv(RecvRequest {
            address: "soak.jobs".into(),
            group: "workers".into(),
            max_messages: 1,
            wait: None,
            max_bytes: 0,
        })
        .await?;
    }

    let mut tasks = Vec::new();
    // Fan-out publisher: SendStream in bursts of 200, paced.
    let fan_pub = {
        let c = client(addr).await?;
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            let mut acked = 0u64;
            let payload = vec![0xaa; 512];
            while Instant::now() < end {
                let p = payload.clone();
                let reqs = tokio_stream::iter((0..200).map(move |_| req("soak.fan", &p)));
                let mut c = c.clone();
                match c.send_stream(reqs).await {
                    Ok(r) => {
                        let mut r = r.into_inner();
                        while let Ok(Some(resp)) = r.message().await {
                            stats.ok();
                            acked = acked.max(resp.sequence);
                        }
                    }
                    Err(s) => stats.err(&s),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            acked
        })
    };
    // Work-queue publisher and two group workers.
    let jobs_acked = Arc::new(Mutex::new(HashSet::new()));
    {
        let mut c = client(addr).await?;
        let stats = Arc::clone(&stats);
        let acked = Arc::clone(&jobs_acked);
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                match c.send(req("soak.jobs", b"job")).await {
                    Ok(r) => {
                        stats.ok();
                        if let Ok(mut a) = acked.lock() {
                            a.insert(r.into_inner().sequence);
                        }
                    }
                    Err(s) => stats.err(&s),
                }
            }
        }));
    }
    let mut workers = Vec::new();
    for _ in 0..2 {
        let mut c = client(addr).await?;
        let stats = Arc::clone(&stats);
        workers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let mut lost = 0;
            loop {
                let r = c
                    .recv(RecvRequest {
                        address: "soak.jobs".into(),
                        group: "workers".into(),
                        max_messages: 50,
                        wait: Some(prost_types::Duration {
                            seconds: 0,
                            nanos: 300_000_000,
                        }),
                        max_bytes: 0,
                    })
                    .await;
                match r {
                    Ok(r) => {
                        stats.ok();
                        let r = r.into_inner();
                        lost += r.dropped;
                        if r.messages.is_empty() && Instant::now() > end {
                            return (got, lost);
                        }
                        got.extend(r.messages.iter().map(|m| m.sequence));
                    }
                    Err(s) => {
                        stats.err(&s);
                        if Instant::now() > hard_stop {
                            return (got, lost);
                        }
                    }
                }
            }
        }));
    }
    // Address churn.
    {
        let mut c = client(addr).await?;
        let stats = Arc::clone(&stats);
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < end {
                let a = format!("soak.churn.{i}");
                for r in [c.send(req(&a, b"x")).await.map(|_| ())] {
                    match r {
                        Ok(()) => stats.ok(),
                        Err(s) => stats.err(&s),
                    }
                }
                match c
                    .recv(RecvRequest {
                        address: a,
                        group: String::new(),
                        max_messages: 1,
                        wait: None,
                        max_bytes: 0,
                    })
                    .await
                {
                    Ok(_) => stats.ok(),
                    Err(s) => stats.err(&s),
                }
                i += 1;
            }
        }));
    }
    // Clients that subscribe, read a little, and vanish.
    {
        let stats = Arc::clone(&stats);
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let Ok(mut c) = client(addr).await else {
                    continue;
                };
                match c
                    .subscribe(SubscribeRequest {
                        address: "soak.fan".into(),
                        group: String::new(),
                        ..Default::default()
                    })
                    .await
                {
                    Ok(s) => {
                        stats.ok();
                        let mut s = s.into_inner();
                        let _ = tokio::time::timeout(Duration::from_millis(50), s.message()).await;
                    }
                    Err(st) => stats.err(&st),
                }
                drop(c);
            }
        }));
    }
    // Latency probe; also samples the broker's RSS.
    let probe = {
        let mut c = client(addr).await?;
        let stats = Arc::clone(&stats);
        let pid = server.child.id();
        tokio::spawn(async move {
            let mut before = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
            let mut during = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
            let mut peak = 0u64;
            while Instant::now() < end {
                let t = Instant::now();
                match c.send(req("soak.probe", b"p")).await {
                    Ok(_) => stats.ok(),
                    Err(s) => stats.err(&s),
                }
                let us = u64::try_from(t.elapsed().as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1);
                // First half: the stalled subscriber is stalled; second half: it catches up.
                let h = if Instant::now() < half {
                    &mut during
                } else {
                    &mut before
                };
                if let Some(h) = h.as_mut() {
                    let _ = h.record(us);
                }
                if let Some(pid) = pid {
                    if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                        if let Some(kib) = s
                            .lines()
                            .find(|l| l.starts_with("VmRSS:"))
                            .and_then(|l| l.split_whitespace().nth(1))
                            .and_then(|v| v.parse::<u64>().ok())
                        {
                            peak = peak.max(kib * 1024);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (during, before, peak)
        })
    };

    let fan_acked = fan_pub.await?;
    fan_last.store(fan_acked, Ordering::Release);
    for t in tasks {
        t.await?;
    }
    let (during, after, peak_rss) = probe.await?;
    let mut lost_fast = 0;
    let mut fast_ok = true;
    for f in fast {
        let (m, d, contiguous) = f.await?;
        lost_fast += d + fan_acked.saturating_sub(m + d);
        fast_ok &= contiguous;
    }
    let (sm, sd, s_contiguous) = stalled.await?;
    let mut group_got = Vec::new();
    let mut group_lost = 0;
    for w in workers {
        let (g, l) = w.await?;
        group_got.extend(g);
        group_lost += l;
    }
    let acked_jobs = jobs_acked.lock().map(|a| a.clone()).unwrap_or_default();
    let got_set: HashSet<u64> = group_got.iter().copied().collect();
    let duplicates = group_got.len() - got_set.len();
    let jobs_missing = acked_jobs.difference(&got_set).count() as u64;

    // Every client is gone: no subscriber may remain.
    let mut open = u64::MAX;
    let wait_until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < wait_until {
        let mut total = 0u64;
        let mut token = String::new();
        loop {
            let page = admin
                .list_addresses(ListAddressesRequest {
                    prefix: "soak.".into(),
                    page_size: 1000,
                    page_token: token,
                })
                .await?
                .into_inner();
            total += page
                .addresses
                .iter()
                .map(|a| u64::from(a.subscribers))
                .sum::<u64>();
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        open = total;
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_end = server.mem("VmRSS:")?;
    let rss_peak = server.mem("VmHWM:")?.max(peak_rss);
    // The clients are gone; an operator clears every address (retention keeps history, so
    // the addresses would otherwise hold their messages). Once the broker has been idle for
    // two maintenance ticks it gives its freed memory back: measure RSS after that.
    let mut deleted = 0u64;
    loop {
        let page = admin
            .list_addresses(ListAddressesRequest {
                prefix: String::new(),
                page_size: 1000,
                page_token: String::new(),
            })
            .await?
            .into_inner();
        if page.addresses.is_empty() {
            break;
        }
        for a in page.addresses {
            admin
                .delete_address(switchboard::pb::DeleteAddressRequest { address: a.address })
                .await?;
            deleted += 1;
        }
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rss_idle = server.mem("VmRSS:")?;

    let errors = stats.errors.lock().map(|e| e.clone()).unwrap_or_default();
    let q = |h: &Option<Histogram<u64>>, p: f64| h.as_ref().map_or(0, |h| h.value_at_quantile(p));
    println!("soak: {secs} s against {addr}");
    println!(
        "requests            {}",
        stats.requests.load(Ordering::Relaxed)
    );
    println!("errors by code      {errors:?}");
    println!("fan-out sent        {fan_acked} (SendStream), 4 fast subscribers + 1 stalled + vanishing clients");
    println!("lost (fast subs)    {lost_fast}   contiguous: {fast_ok}");
    println!("stalled subscriber  {sm} received + {sd} dropped = {} of {fan_acked}   contiguous: {s_contiguous}", sm + sd);
    println!("work queue          {} acked, {} taken, {jobs_missing} missing, {duplicates} duplicates, {group_lost} dropped", acked_jobs.len(), group_got.len());
    println!(
        "send latency (us)   while a subscriber is stalled: p50 {} p99 {}; after: p50 {} p99 {}",
        q(&during, 0.5),
        q(&during, 0.99),
        q(&after, 0.5),
        q(&after, 0.99)
    );
    println!(
        "RSS (MiB)           start {:.1}  peak {:.1}  end {:.1}  idle {:.1} (after deleting {deleted} addresses and 4 s idle)",
        mib(rss_start),
        mib(rss_peak),
        mib(rss_end),
        mib(rss_idle)
    );
    println!("open subscribers    {open} at the end");
    let ok = errors.is_empty()
        && lost_fast == 0
        && fast_ok
        && s_contiguous
        && sm + sd == fan_acked
        && jobs_missing == 0
        && duplicates == 0
        && group_lost == 0
        && open == 0;
    println!("verdict             {}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}

#[allow(clippy::cast_precision_loss, reason = "display only")]
fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

//! The broker core without gRPC: the [`Broker`] handle (Send, Recv, Subscribe, consumer
//! groups, Admin figures) over an [`Engine`], and [`Subscription`]s. Usable in-process (tests,
//! embedding); the gRPC face in `grpc/` only translates to it.
//!
//! Policy lives here (validation of sizes, the small-payload copy, long-poll waits, shutdown,
//! subscriber limits); storage lives in the engine. Nothing here imports `grpc/`.

pub mod read_budget;
mod redis;
pub mod subscription;

use crate::engine::{
    disk::DiskConfig,
    redis::{RedisConfig, RedisEngine},
    Durable,
};
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

pub use subscription::{Event, PatternSubscription, Subscription};

use crate::{
    config::{Limits, MESSAGE_OVERHEAD_BYTES},
    engine::{
        AddressInfo, Appended, Batch, DeadLetter, Engine, GroupInfo, GroupSettings, Log,
        NewMessage, Settle, StartAt,
    },
    error::BrokerError,
    metrics::Metrics,
    shutdown::ShutdownToken,
    validate::{self, Address, Group, Headers, Pattern},
};
use read_budget::ReadBudget;

/// Payloads smaller than this are copied out of the receive buffer on Send (see `send`).
const UNPIN_BELOW_BYTES: usize = 64 * 1024;

/// A batch packs its small payloads into shared chunks of at most this many bytes (see
/// [`PayloadCopy`]).
const UNPIN_CHUNK_BYTES: usize = 1024;

/// Copies small payloads out of the request's receive buffer.
///
/// A small payload decoded by tonic is a slice of the connection's receive buffer; kept as is,
/// it would pin that whole buffer for as long as it is retained. Copying it (small, once per
/// message) keeps retained memory close to what the budget counts.
///
/// A batch's messages all go to one address and leave its window in order, so consecutive
/// payloads of up to a quarter of [`UNPIN_CHUNK_BYTES`] share one chunk: one allocation per
/// chunk instead of one per message. Each chunk is sized to the batch's payloads still to come
/// (no spare room is allocated), and is freed when its last message is evicted, so what chunks
/// hold beyond the budget's count is at most one chunk (1 KiB) per address: the one at the
/// front of its window, partly evicted. Single Sends (whose consecutive messages may go to
/// different addresses) get a copy of their own.
struct PayloadCopy {
    /// The current chunk's free space; `None` for single Sends.
    chunk: Option<BytesMut>,
    /// Bytes of the batch's shareable payloads not copied yet.
    left: usize,
}

impl PayloadCopy {
    fn single() -> Self {
        Self {
            chunk: None,
            left: 0,
        }
    }

    /// For a batch whose payloads have these lengths, in order.
    fn batch(lengths: impl Iterator<Item = usize>) -> Self {
        Self {
            chunk: Some(BytesMut::new()),
            left: lengths.filter(|&n| Self::shares(n)).sum(),
        }
    }

    /// Whether a payload of `n` bytes goes into a batch's shared chunk.
    fn shares(n: usize) -> bool {
        n > 0 && n <= UNPIN_CHUNK_BYTES / 4
    }

    /// The payload to store: `payload` itself from [`UNPIN_BELOW_BYTES`] up, else a copy.
    fn copy(&mut self, payload: Bytes) -> Bytes {
        let n = payload.len();
        if n >= UNPIN_BELOW_BYTES {
            return payload;
        }
        match &mut self.chunk {
            Some(chunk) if Self::shares(n) && n <= self.left => {
                if chunk.capacity() - chunk.len() < n {
                    *chunk = BytesMut::with_capacity(UNPIN_CHUNK_BYTES.min(self.left));
                }
                self.left -= n;
                chunk.extend_from_slice(&payload);
                chunk.split().freeze()
            }
            _ => Bytes::copy_from_slice(&payload),
        }
    }
}

/// A cheap-clone handle to the broker's state.
#[derive(Clone, Debug)]
pub struct Broker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    engine: Engine,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Ids of group streams, which hold leases (0 is every Recv caller).
    next_holder: AtomicU64,
    /// What readers hold beyond retention (`--max-read-buffer-bytes`).
    read_budget: ReadBudget,
}

/// Most messages one SendBatch carries.
pub const MAX_BATCH_MESSAGES: usize = 1000;

/// Most sequences one Ack, Nack or ExtendLease names.
pub const MAX_SETTLE_SEQUENCES: usize = 1000;

/// Headers a dead-lettered message gains (besides its own).
pub mod dead_letter_headers {
    /// The address it was sent to.
    pub const ADDRESS: &str = "switchboard-dead-letter-address";
    /// The group that gave up on it.
    pub const GROUP: &str = "switchboard-dead-letter-group";
    /// Its sequence on the original address, decimal.
    pub const SEQUENCE: &str = "switchboard-dead-letter-sequence";
    /// How many times it was delivered, decimal.
    pub const DELIVERIES: &str = "switchboard-dead-letter-deliveries";
}

impl Broker {
    /// A broker with no addresses on the in-memory engine, enforcing `limits` (assumed
    /// validated, see [`Limits::validate`]).
    pub fn new(limits: Limits) -> Self {
        let metrics = Arc::new(Metrics::new());
        let engine = Engine::memory(&limits, Arc::clone(&metrics));
        Self {
            inner: Arc::new(Inner {
                engine,
                metrics,
                next_holder: AtomicU64::new(1),
                read_budget: ReadBudget::new(limits.max_read_buffer_bytes),
                limits,
            }),
        }
    }

    /// A broker on the disk engine in `config.dir` (see [`crate::engine::disk`]): every address
    /// found there is recovered first.
    ///
    /// # Errors
    /// As [`Engine::disk`]: the directory is locked by another broker, unusable, or holds a
    /// corrupt log (without `--repair`).
    pub fn with_disk(limits: Limits, config: &DiskConfig) -> Result<Self, String> {
        let metrics = Arc::new(Metrics::new());
        let engine = Engine::disk(&limits, Arc::clone(&metrics), config)?;
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                metrics,
                next_holder: AtomicU64::new(1),
                read_budget: ReadBudget::new(limits.max_read_buffer_bytes),
                limits,
            }),
        })
    }

    /// A broker on the Redis Streams engine (see [`crate::engine::redis`]): every node started
    /// on the same Redis serves the same addresses.
    ///
    /// # Errors
    /// A bad URL, or Redis unreachable: a message naming Redis.
    pub async fn with_redis(limits: Limits, config: &RedisConfig) -> Result<Self, String> {
        let metrics = Arc::new(Metrics::new());
        let engine = RedisEngine::connect(&limits, Arc::clone(&metrics), config).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                engine: Engine::Redis(Arc::new(engine)),
                metrics,
                next_holder: AtomicU64::new(1),
                read_budget: ReadBudget::new(limits.max_read_buffer_bytes),
                limits,
            }),
        })
    }

    /// The Redis engine, when it is the one in use.
    fn redis(&self) -> Option<&Arc<RedisEngine>> {
        match &self.inner.engine {
            Engine::Redis(r) => Some(r),
            _ => None,
        }
    }

    /// Long-polling Recv calls waiting on this node for `address` on the Redis engine (which
    /// counts them to wake one per new message per group); 0 on the local engines.
    pub fn redis_waiters(&self, address: &str) -> usize {
        self.redis().map_or(0, |r| r.waiters(address))
    }

    /// Whether the broker can serve: always, but on the Redis engine only while Redis answered
    /// the last [`Broker::probe`].
    pub fn serving(&self) -> bool {
        self.redis().is_none_or(|r| r.reachable())
    }

    /// On the Redis engine, PINGs Redis and returns whether it answered; elsewhere `true`.
    pub async fn probe(&self) -> bool {
        match self.redis() {
            Some(r) => r.ping().await,
            None => true,
        }
    }

    /// Whether the engine is the Redis engine (whose health follows Redis's).
    pub fn on_redis(&self) -> bool {
        self.redis().is_some()
    }

    /// Begins shutdown: every Send from now on is refused with `UNAVAILABLE`. Call it before
    /// triggering the shutdown token, so that draining subscribers miss nothing acknowledged.
    pub fn begin_shutdown(&self) {
        self.inner.engine.begin_shutdown();
    }

    /// The broker's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The broker-wide budget of what readers hold beyond retention.
    pub fn read_budget(&self) -> &ReadBudget {
        &self.inner.read_budget
    }

    /// The engine underneath.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Sends one message; returns its sequence.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` ([`BrokerError::TooLarge`]) when the payload is above
    /// `--max-message-bytes`, the headers above 16 KiB, or the message alone (payload + headers +
    /// 128 bytes overhead) above `--retention-bytes` or `--max-retained-bytes`;
    /// `INVALID_ARGUMENT` for more than 64 headers or an empty header key; `RESOURCE_EXHAUSTED`
    /// when the address does not exist and `--max-addresses` is reached; `UNAVAILABLE` once
    /// shutdown has begun; `UNAVAILABLE` ("storage: ...") when the disk engine could not make
    /// it durable. Nothing is stored then.
    ///
    /// In the disk engine this returns once the message is on stable storage (see
    /// [`Broker::publish_staged`]).
    pub async fn send(
        &self,
        address: &Address,
        payload: Bytes,
        headers: Headers,
    ) -> Result<u64, BrokerError> {
        self.publish(address, payload, headers, "")
            .await
            .map(|a| a.sequence)
    }

    /// [`Broker::send`] with publish deduplication: a non-empty `message_id` (at most 255
    /// bytes) seen on this address within `--dedup-window`, while its message is retained,
    /// stores nothing and returns the first Send's sequence with `duplicate = true` (NATS
    /// JetStream's `Nats-Msg-Id`). Concurrent Sends with the same id store exactly one message.
    ///
    /// # Errors
    /// As [`Broker::send`], and `INVALID_ARGUMENT` for a `message_id` over 255 bytes.
    pub async fn publish(
        &self,
        address: &Address,
        payload: Bytes,
        headers: Headers,
        message_id: &str,
    ) -> Result<Appended, BrokerError> {
        let (appended, durable) = self.publish_staged(address, payload, headers, message_id)?;
        match durable.wait_appended().await? {
            Some(remote) => remote.first().copied().ok_or(BrokerError::Storage(
                "redis: no sequence in the reply".into(),
            )),
            None => Ok(appended),
        }
    }

    /// [`Broker::publish`] without waiting: the sequence is assigned and, in the disk engine,
    /// the message is queued for the flusher; answer the client only once the returned
    /// [`Durable`] resolves `Ok` (SendStream keeps many in flight this way, sharing fsyncs).
    ///
    /// # Errors
    /// As [`Broker::publish`], but for storage errors, which the [`Durable`] reports.
    pub fn publish_staged(
        &self,
        address: &Address,
        payload: Bytes,
        headers: Headers,
        message_id: &str,
    ) -> Result<(Appended, Durable), BrokerError> {
        let m = self.prepare(payload, headers, message_id, &mut PayloadCopy::single())?;
        if let Some(r) = self.redis() {
            // The sequence comes with Redis's reply: the Durable carries it. Queued, so that one
            // stream's Sends stay in order and go to Redis many per call.
            let rx = r.append_queued(address.as_str(), vec![m]);
            return Ok((
                Appended {
                    sequence: 0,
                    duplicate: false,
                },
                Durable::appending(rx),
            ));
        }
        self.inner.engine.append(
            address,
            m.payload,
            m.headers,
            m.size,
            m.message_id.as_deref(),
        )
    }

    /// Sends 1 to [`MAX_BATCH_MESSAGES`] messages to one address in one step (Google Pub/Sub's
    /// batched Publish): every message is checked first, and one refusal refuses the whole
    /// batch (the error names `messages[i]`), with nothing stored; then all are appended under
    /// one address lock with consecutive sequences, one wake-up of the address's readers.
    /// Duplicates (`message_id`) are answered with their first sequence and not stored.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for no message or more than 1,000; each message's errors as for
    /// [`Broker::publish`], wrapped in [`BrokerError::InBatch`]; `RESOURCE_EXHAUSTED` when the
    /// batch's bytes exceed `--retention-bytes`; `UNAVAILABLE` once shutdown has begun.
    pub async fn send_batch(
        &self,
        address: &Address,
        messages: Vec<(Bytes, Headers, String)>,
    ) -> Result<Vec<Appended>, BrokerError> {
        if messages.is_empty() || messages.len() > MAX_BATCH_MESSAGES {
            return Err(BrokerError::invalid(
                "messages",
                format!(
                    "{} given; a batch holds 1 to {MAX_BATCH_MESSAGES} messages",
                    messages.len()
                ),
            ));
        }
        let mut prepared = Vec::with_capacity(messages.len());
        let mut total = 0usize;
        let mut unpin = PayloadCopy::batch(messages.iter().map(|(payload, _, _)| payload.len()));
        for (index, (payload, headers, id)) in messages.into_iter().enumerate() {
            let m = self
                .prepare(payload, headers, &id, &mut unpin)
                .map_err(|e| BrokerError::InBatch {
                    index,
                    error: Box::new(e),
                })?;
            total += m.size;
            prepared.push(m);
        }
        let limit = self.inner.limits.retention_bytes;
        if total > limit {
            return Err(BrokerError::TooLarge {
                field: "messages",
                actual: total,
                limit,
                limit_name: "--retention-bytes",
            });
        }
        if let Some(r) = self.redis() {
            return r
                .append_queued(address.as_str(), prepared)
                .await
                .map_err(|_| BrokerError::Storage("redis: append abandoned".into()))?;
        }
        let (appended, durable) = self.inner.engine.append_batch(address, prepared)?;
        durable.wait().await?;
        Ok(appended)
    }

    /// Checks one message and makes it ready to store (a small payload is copied by `unpin`).
    fn prepare(
        &self,
        payload: Bytes,
        headers: Headers,
        message_id: &str,
        unpin: &mut PayloadCopy,
    ) -> Result<NewMessage, BrokerError> {
        let limits = &self.inner.limits;
        if message_id.len() > validate::MAX_NAME_BYTES {
            return Err(BrokerError::invalid(
                "message_id",
                format!(
                    "{} bytes is longer than the limit of {} bytes",
                    message_id.len(),
                    validate::MAX_NAME_BYTES
                ),
            ));
        }
        validate::payload(payload.len(), limits)?;
        let size = payload.len() + validate::headers(&headers)? + MESSAGE_OVERHEAD_BYTES;
        let payload = unpin.copy(payload);
        for (limit, limit_name) in [
            (limits.retention_bytes, "--retention-bytes"),
            (limits.max_retained_bytes, "--max-retained-bytes"),
        ] {
            if size > limit {
                return Err(BrokerError::TooLarge {
                    field: "payload",
                    actual: size,
                    limit,
                    limit_name,
                });
            }
        }
        Ok(NewMessage {
            payload,
            headers,
            size,
            message_id: (!message_id.is_empty()).then(|| message_id.to_string()),
        })
    }

    /// Takes up to `max` messages (1–1000) for `group`, at most `max_bytes` encoded as a
    /// `RecvResponse` (the batch ends before the message that would cross it), waiting up to
    /// `wait` for the first one. Returns early with an empty batch when `shutdown` fires.
    ///
    /// Each message goes to exactly one caller of a group (competing consumers, like NATS queue
    /// groups or a Kafka consumer group). The default group (`""`) exists from the address's
    /// creation; a named group starts where CreateGroup put it, or at the messages sent after
    /// its first use.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` when the address does not exist and `--max-addresses` is reached,
    /// or when the next message alone is larger than `max_bytes` (then nothing is taken);
    /// `NOT_FOUND` when an operator deletes the address or the group during the wait.
    pub async fn recv(
        &self,
        address: &Address,
        group: &Group,
        max: usize,
        max_bytes: usize,
        wait: Duration,
        shutdown: &mut ShutdownToken,
    ) -> Result<Batch, BrokerError> {
        if let Some(r) = self.redis() {
            return self
                .recv_redis(r, address, group, (max, max_bytes), wait, shutdown)
                .await;
        }
        let deadline = Instant::now() + wait;
        let (log, id, mut batch) =
            self.inner
                .engine
                .take(address, group.as_str(), max, max_bytes, !wait.is_zero())?;
        // An empty batch registered a waiting Recv (undone however this call ends).
        let _waiting = (batch.is_empty() && !wait.is_zero()).then(|| WaiterGuard(&log));
        self.dead_letter(std::mem::take(&mut batch.dead_letters));
        std::mem::take(&mut batch.durable).wait().await?;
        batch.refuse_if_too_large()?;
        if !batch.is_empty() || wait.is_zero() {
            return Ok(batch);
        }
        let mut next_due = batch.next_due;
        loop {
            let notified = log.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            log.check_deleted()?;
            let mut batch = log.take(group.as_str(), id, max, max_bytes, 0)?;
            self.dead_letter(std::mem::take(&mut batch.dead_letters));
            std::mem::take(&mut batch.durable).wait().await?;
            batch.refuse_if_too_large()?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            next_due = batch.next_due.or(next_due);
            // Also wake when a lease expires or a delayed redelivery falls due.
            let wake = next_due.map_or(deadline, |d| d.min(deadline));
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(wake) => {
                    if wake >= deadline {
                        return Ok(Batch::default());
                    }
                    next_due = None;
                }
                () = shutdown.cancelled() => return Ok(Batch::default()),
            }
        }
    }

    /// Registers a subscriber and returns its stream of events. Registration is complete when
    /// this returns: every message sent afterwards is delivered (or counted as dropped).
    ///
    /// With the default group (`""`) the subscriber is fan-out: it gets every message from
    /// `start` on ([`StartAt::End`]: those sent after now). With a named group it competes with
    /// the group's other members (Recv callers and streams); `start` must then be
    /// [`StartAt::End`] (a group has its own position).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a start with a group; `OUT_OF_RANGE` for a start past the last
    /// sequence + 1; `RESOURCE_EXHAUSTED` when the address already has
    /// `--max-subscribers-per-address` subscribers, or does not exist and `--max-addresses` is
    /// reached.
    pub async fn subscribe(
        &self,
        address: &Address,
        group: &Group,
        start: StartAt,
        shutdown: ShutdownToken,
    ) -> Result<Subscription, BrokerError> {
        let max = self.inner.limits.max_subscribers_per_address;
        if let Some(r) = self.redis() {
            return self
                .subscribe_redis(r, address, group, start, shutdown)
                .await;
        }
        let full = || BrokerError::LimitReached {
            what: "subscribers on this address",
            limit: max,
            flag: "--max-subscribers-per-address",
        };
        if group.is_default() {
            let (log, cursor) = self
                .inner
                .engine
                .subscribe_fanout(address, start, max, full)?;
            Ok(Subscription::fanout(
                log,
                cursor,
                self.inner.read_budget.clone(),
                shutdown,
            ))
        } else {
            if start != StartAt::End {
                return Err(BrokerError::invalid(
                    "start_sequence",
                    "start_sequence and start_time are for fan-out streams only; a group has its own position (set it with CreateGroup)",
                ));
            }
            let (log, id) =
                self.inner
                    .engine
                    .subscribe_group(address, group.as_str(), max, full)?;
            let holder = self.inner.next_holder.fetch_add(1, Ordering::Relaxed);
            Ok(Subscription::group(
                self.clone(),
                log,
                group.clone(),
                id,
                holder,
                shutdown,
            ))
        }
    }

    /// Subscribes to every address matching `pattern` (NATS subject syntax: `*` one token,
    /// `>` one or more trailing tokens): messages sent from now on to any matching address,
    /// existing or created later, each with its own address and sequence, in order per
    /// address. Registration is complete when this returns.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` past the broker's pattern-subscription limit.
    pub fn subscribe_pattern(
        &self,
        pattern: Pattern,
        shutdown: ShutdownToken,
    ) -> Result<PatternSubscription, BrokerError> {
        let feed = self.inner.engine.subscribe_pattern(pattern)?;
        self.inner.metrics.subscribers.inc();
        Ok(PatternSubscription::new(self.clone(), feed, shutdown))
    }

    /// Creates the named consumer group `group` on `address` (created if needed), starting at
    /// `start`. Idempotent: the same start again returns `created = false`. Returns whether it
    /// was created and the sequence it hands out next. Kafka's consumer-group offset reset,
    /// NATS JetStream's consumer `DeliverPolicy`.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for the default group; `ALREADY_EXISTS` when the group exists with
    /// another start; `OUT_OF_RANGE` for a start past the last sequence + 1;
    /// `RESOURCE_EXHAUSTED` for `--max-addresses`.
    pub async fn create_group(
        &self,
        address: &Address,
        group: &Group,
        settings: GroupSettings,
    ) -> Result<(bool, u64), BrokerError> {
        if group.is_default() {
            return Err(BrokerError::invalid(
                "group",
                "must not be empty: the default group always exists (1-255 bytes)",
            ));
        }
        if let Some(dlq) = settings.ack.as_ref().and_then(|a| a.dead_letter.as_ref()) {
            if dlq == address {
                return Err(BrokerError::invalid(
                    "dead_letter_address",
                    "must differ from address (a message would be dead-lettered to itself)",
                ));
            }
        }
        if let Some(r) = self.redis() {
            return r
                .create_group(address.as_str(), group.as_str(), &settings)
                .await;
        }
        let (created, next, durable) =
            self.inner
                .engine
                .create_group(address, group.as_str(), settings)?;
        durable.wait().await?;
        Ok((created, next))
    }

    /// Ack, Nack (with its delay) or ExtendLease of `sequences` (1 to 1,000) of `group`, a
    /// group with acknowledgements. Returns the sequences that were not awaiting an
    /// acknowledgement (already acknowledged, dead-lettered, evicted, never handed out). A
    /// Nack on a message's last allowed delivery dead-letters it at once.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for no sequence or more than 1,000; `FAILED_PRECONDITION` naming the
    /// group when it is the default group, unknown, or has no `ack_wait`.
    pub async fn settle(
        &self,
        address: &Address,
        group: &Group,
        sequences: &[u64],
        op: Settle,
    ) -> Result<Vec<u64>, BrokerError> {
        if sequences.is_empty() || sequences.len() > MAX_SETTLE_SEQUENCES {
            return Err(BrokerError::invalid(
                "sequences",
                format!(
                    "{} given; name 1 to {MAX_SETTLE_SEQUENCES} sequences",
                    sequences.len()
                ),
            ));
        }
        if let Some(r) = self.redis() {
            let address: Arc<str> = Arc::from(address.as_str());
            let (not_pending, dead) = r.settle(&address, group.as_str(), sequences, op).await?;
            self.dead_letter(dead);
            return Ok(not_pending);
        }
        let settled = self
            .inner
            .engine
            .settle(address.as_str(), group.as_str(), sequences, op)?;
        self.dead_letter(settled.dead_letters);
        settled.durable.wait().await?;
        Ok(settled.not_pending)
    }

    /// Disk engine: once the dead letter `d` is durable, journals its original as finished
    /// with, so a crash in between delivers the original again rather than losing both.
    fn finish_dead_letter(&self, d: &DeadLetter, durable: Durable) {
        if durable.is_done() {
            return;
        }
        let broker = self.clone();
        let (address, group, sequence) = (
            Arc::clone(&d.message.address),
            d.group.clone(),
            d.message.sequence,
        );
        let finish = async move {
            match durable.wait().await {
                Ok(()) => broker
                    .inner
                    .engine
                    .journal_done(&address, &group, vec![sequence]),
                Err(e) => tracing::warn!(
                    address = %address,
                    group = %group,
                    sequence,
                    error = %e,
                    "dead letter not stored; the message is delivered again after a restart"
                ),
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(finish);
            }
            Err(_) => tracing::warn!(
                sequence,
                "dead letter outside a runtime: its original is delivered again after a restart"
            ),
        }
    }

    /// Sends dead-lettered messages on to their dead-letter addresses: payload and headers
    /// unchanged, plus the four `switchboard-dead-letter-*` headers. A dead letter that cannot
    /// be stored (shutdown, a limit) is logged and counted as lost; in the disk engine its
    /// original is delivered again after a restart instead (at least once into the
    /// dead-letter address).
    pub(crate) fn dead_letter(&self, letters: Vec<DeadLetter>) {
        if letters.is_empty() {
            return;
        }
        if let Some(r) = self.redis() {
            self.dead_letter_redis(r, letters);
            return;
        }
        for d in letters {
            let (headers, size) = Self::dead_letter_headers(&d);
            let limits = &self.inner.limits;
            let stored = if size > limits.retention_bytes.min(limits.max_retained_bytes) {
                Err(BrokerError::TooLarge {
                    field: "payload",
                    actual: size,
                    limit: limits.retention_bytes.min(limits.max_retained_bytes),
                    limit_name: "--retention-bytes",
                })
            } else {
                self.inner
                    .engine
                    .append(&d.to, d.message.payload.clone(), headers, size, None)
                    .map(|(_, durable)| self.finish_dead_letter(&d, durable))
            };
            if let Err(e) = stored {
                tracing::warn!(
                    address = %d.message.address,
                    group = %d.group,
                    sequence = d.message.sequence,
                    dead_letter_address = d.to.as_str(),
                    error = %e,
                    "dead letter not stored"
                );
            }
        }
    }

    /// A dead letter's headers (its own plus the four `switchboard-dead-letter-*`) and the bytes
    /// it is charged.
    fn dead_letter_headers(d: &DeadLetter) -> (Headers, usize) {
        let mut headers = d.message.headers.clone();
        headers.insert(
            dead_letter_headers::ADDRESS.into(),
            d.message.address.to_string(),
        );
        headers.insert(dead_letter_headers::GROUP.into(), d.group.clone());
        headers.insert(
            dead_letter_headers::SEQUENCE.into(),
            d.message.sequence.to_string(),
        );
        headers.insert(
            dead_letter_headers::DELIVERIES.into(),
            d.deliveries.to_string(),
        );
        let size = d.message.payload.len()
            + headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + MESSAGE_OVERHEAD_BYTES;
        (headers, size)
    }

    /// Deletes the named group `group` of `address`: its position is forgotten, its streams end
    /// and its waiting Recv calls return with `NOT_FOUND` ("group deleted").
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for the default group; `NOT_FOUND` for an unknown address or group.
    pub async fn delete_group(&self, address: &Address, group: &Group) -> Result<(), BrokerError> {
        if group.is_default() {
            return Err(BrokerError::invalid(
                "group",
                "must not be empty: the default group cannot be deleted (1-255 bytes)",
            ));
        }
        if let Some(r) = self.redis() {
            return r.delete_group(address.as_str(), group.as_str()).await;
        }
        self.inner
            .engine
            .delete_group(address.as_str(), group.as_str())?
            .wait()
            .await
    }

    /// Admin's GetAddress: [`Broker::address_info`] on any engine (a round trip on Redis).
    ///
    /// # Errors
    /// `UNAVAILABLE` when the Redis engine cannot reach Redis.
    pub async fn inspect(
        &self,
        address: &str,
        with_groups: bool,
    ) -> Result<Option<(AddressInfo, Vec<GroupInfo>)>, BrokerError> {
        match self.redis() {
            Some(r) => r.address_info(address, with_groups).await,
            None => Ok(self.address_info(address, with_groups)),
        }
    }

    /// Admin's ListAddresses: [`Broker::list_addresses`] on any engine.
    ///
    /// # Errors
    /// `UNAVAILABLE` when the Redis engine cannot reach Redis.
    pub async fn list(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<AddressInfo>, Option<String>), BrokerError> {
        match self.redis() {
            Some(r) => r.list_addresses(prefix, after, limit).await,
            None => Ok(self.list_addresses(prefix, after, limit)),
        }
    }

    /// Admin's DeleteAddress: [`Broker::delete_address`] on any engine. On Redis, streams on
    /// other nodes notice within a second (see `engine::redis::feed`).
    ///
    /// # Errors
    /// `UNAVAILABLE` when the Redis engine cannot reach Redis.
    pub async fn purge(&self, address: &str) -> Result<Option<usize>, BrokerError> {
        match self.redis() {
            Some(r) => r.delete_address(address).await,
            None => Ok(self.delete_address(address)),
        }
    }

    /// Subscribers (fan-out and group streams) on `address` now; 0 for an unknown address.
    pub fn subscriber_count(&self, address: &str) -> usize {
        self.inner.engine.counts(address)[0]
    }

    /// Pattern (wildcard) subscriptions open now.
    pub fn pattern_subscriptions(&self) -> usize {
        self.inner.engine.pattern_count()
    }

    /// Recv calls waiting on `address` now; 0 for an unknown address.
    pub fn waiting_recvs(&self, address: &str) -> usize {
        self.inner.engine.counts(address)[1]
    }

    /// Messages retained by `address` now; 0 for an unknown address.
    pub fn retained_messages(&self, address: &str) -> usize {
        self.inner.engine.counts(address)[2]
    }

    /// Bytes retained by `address` now (payload + headers + 128 per message).
    pub fn retained_bytes(&self, address: &str) -> usize {
        self.inner.engine.counts(address)[3]
    }

    /// Whether the broker holds `address` now.
    pub fn contains(&self, address: &str) -> bool {
        self.inner.engine.contains(address)
    }

    /// Addresses held now.
    pub fn address_count(&self) -> usize {
        self.inner.engine.address_count()
    }

    /// Messages retained across all addresses now.
    pub fn total_retained_messages(&self) -> usize {
        self.inner.engine.total_retained_messages()
    }

    /// Bytes retained across all addresses now.
    pub fn total_retained_bytes(&self) -> usize {
        self.inner.engine.total_retained_bytes()
    }

    /// One address's figures and, with `with_groups`, its groups'; `None` if it does not exist.
    pub fn address_info(
        &self,
        address: &str,
        with_groups: bool,
    ) -> Option<(AddressInfo, Vec<GroupInfo>)> {
        self.inner.engine.address_info(address, with_groups)
    }

    /// Addresses whose name starts with `prefix` and sorts after `after`, in name order, at most
    /// `limit`; and the name to continue after when more remain.
    pub fn list_addresses(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> (Vec<AddressInfo>, Option<String>) {
        self.inner.engine.list_addresses(prefix, after, limit)
    }

    /// Deletes `address`: purges its messages; its subscribers' streams end with `NOT_FOUND`
    /// ("address deleted") and waiting Recv calls return `NOT_FOUND`. Returns how many messages
    /// were purged, or `None` if the address did not exist. A later Send creates it afresh.
    pub fn delete_address(&self, address: &str) -> Option<usize> {
        self.inner.engine.delete_address(address)
    }

    /// Evicts messages past `--retention-age` and removes every address that has been idle for
    /// `--idle-address-ms` (nothing retained, no subscriber, no waiting Recv, no created group).
    /// Returns how many addresses were removed.
    pub fn reclaim_idle(&self) -> usize {
        let m = self.inner.engine.maintain();
        self.dead_letter(m.dead_letters);
        m.reclaimed
    }

    /// Runs the engine's maintenance (age eviction, idle reclaim) every half idle period (at
    /// most every second) until `shutdown` fires.
    pub async fn run_reclaimer(self, mut shutdown: ShutdownToken) {
        let mut tick = tokio::time::interval(self.inner.engine.maintenance_period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut trim = crate::alloc::IdleTrim::default();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Some(r) = self.redis() {
                        match r.evict_aged().await {
                            Ok(n) if n > 0 => tracing::debug!(aged = n, "retention sweep"),
                            Ok(_) => {}
                            Err(e) => tracing::debug!(error = %e, "retention sweep failed"),
                        }
                        continue;
                    }
                    let m = self.inner.engine.maintain();
                    let (aged, reclaimed) = (m.aged, m.reclaimed);
                    self.dead_letter(m.dead_letters);
                    if aged > 0 || reclaimed > 0 {
                        tracing::debug!(aged, reclaimed, "retention sweep");
                    }
                    let metrics = &self.inner.metrics;
                    // Anything that moves: traffic, addresses coming or going, retained bytes.
                    let activity = metrics.sent.get()
                        + metrics.delivered.get()
                        + self.address_count() as u64
                        + self.total_retained_bytes() as u64;
                    if trim.tick(activity) {
                        self.inner.engine.shrink();
                        crate::alloc::release_free_memory();
                        tracing::debug!("idle: freed memory returned to the operating system");
                    }
                }
                () = shutdown.cancelled() => return,
            }
        }
    }
}

struct WaiterGuard<'a>(&'a Log);

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.0.remove_waiter();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where `b`'s bytes are.
    fn span(b: &Bytes) -> std::ops::Range<usize> {
        let p = b.as_ptr() as usize;
        p..p + b.len()
    }

    #[test]
    fn a_batch_copies_small_payloads_out_of_the_request_into_shared_chunks() {
        let request = Bytes::from((0..=255u8).cycle().take(20_000).collect::<Vec<u8>>());
        let within = |b: &Bytes| {
            let r = span(&request);
            b.is_empty() || (r.contains(&span(b).start) && span(b).end <= r.end)
        };
        let small = |i: usize| request.slice(i * 128..(i + 1) * 128);
        let mid = request.slice(0..UNPIN_CHUNK_BYTES / 4 + 1);
        let big = Bytes::from(vec![9u8; UNPIN_BELOW_BYTES]);
        // 20 payloads of 128 bytes (2,560 shareable bytes), one just over a quarter of a
        // chunk, one at the copy threshold, one empty.
        let lengths = (0..20).map(|_| 128).chain([mid.len(), big.len(), 0]);
        let mut unpin = PayloadCopy::batch(lengths);
        let copies: Vec<Bytes> = (0..20).map(|i| unpin.copy(small(i))).collect();
        for (i, b) in copies.iter().enumerate() {
            assert_eq!(b, &small(i), "contents kept");
            assert!(!within(b), "copied out of the request buffer");
        }
        // 8 payloads of 128 bytes fill a 1 KiB chunk; the 9th starts the next one.
        for i in (1..20).filter(|i| i % 8 != 0) {
            assert_eq!(
                span(&copies[i]).start,
                span(&copies[i - 1]).end,
                "same chunk"
            );
        }
        for i in [8, 16] {
            assert_ne!(
                span(&copies[i]).start,
                span(&copies[i - 1]).end,
                "next chunk"
            );
        }
        // The last chunk is sized to the 4 payloads left: no spare room is allocated.
        assert_eq!(unpin.left, 0);
        assert_eq!(unpin.chunk.as_ref().map(BytesMut::capacity), Some(0));
        // Over a quarter of a chunk: a copy of its own. At 64 KiB and above: kept as is.
        let own = unpin.copy(mid.clone());
        assert!(!within(&own));
        assert_eq!(own, mid);
        assert_eq!(span(&unpin.copy(big.clone())), span(&big));
        assert!(unpin.copy(Bytes::new()).is_empty());
    }

    #[test]
    fn a_single_send_gets_a_copy_of_its_own() {
        let request = Bytes::from(vec![5u8; 1024]);
        let mut unpin = PayloadCopy::single();
        let a = unpin.copy(request.slice(0..100));
        let b = unpin.copy(request.slice(100..200));
        assert_eq!((a.as_ref(), b.as_ref()), (&[5u8; 100][..], &[5u8; 100][..]));
        assert!(!span(&request).contains(&span(&a).start));
        assert_ne!(span(&b).start, span(&a).end, "no shared chunk across Sends");
    }
}

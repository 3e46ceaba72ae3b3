//! [`BrokerError`], the broker's one error type, and its one mapping to a gRPC [`tonic::Status`].

/// Everything a request can be refused for. Messages name the field, the value and the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// A field broke a rule (length, characters, range). Maps to `INVALID_ARGUMENT`.
    #[error("{field}: {reason}")]
    Invalid {
        /// The request field, as named in the proto (`address`, `wait`, ...).
        field: &'static str,
        /// What was wrong, with the limit.
        reason: String,
    },
    /// A field is larger than a size limit. Maps to `RESOURCE_EXHAUSTED`.
    #[error("{field}: {actual} bytes exceeds the limit of {limit} bytes ({limit_name})")]
    TooLarge {
        /// The request field (`payload`, `headers`).
        field: &'static str,
        /// Its size in bytes.
        actual: usize,
        /// The limit in bytes.
        limit: usize,
        /// Which limit (the flag that sets it).
        limit_name: &'static str,
    },
    /// Recv: the next message does not fit the response's byte limit (`max_bytes`, or the
    /// broker's response limit); nothing was taken. Maps to `RESOURCE_EXHAUSTED`.
    #[error("max_bytes: the next message (sequence {sequence}) needs a response of {bytes} bytes, more than max_bytes allows (0 = 4194304, the usual client receive limit); nothing was taken: raise max_bytes and the client's receive limit")]
    BatchTooLarge {
        /// The message's sequence.
        sequence: u64,
        /// The encoded `RecvResponse` holding it alone (upper bound), bytes.
        bytes: usize,
    },
    /// An operator deleted the address (Admin `DeleteAddress`) while this call was open.
    /// Maps to `NOT_FOUND`.
    #[error("address deleted")]
    AddressDeleted,
    /// The address does not exist (Admin RPCs). Maps to `NOT_FOUND`.
    #[error("address: no such address {0:?}")]
    NoSuchAddress(String),
    /// A configured limit is reached. Maps to `RESOURCE_EXHAUSTED`.
    #[error("{what}: the limit of {limit} is reached ({flag})")]
    LimitReached {
        /// What is counted.
        what: &'static str,
        /// The limit.
        limit: usize,
        /// The flag that sets it.
        flag: &'static str,
    },
    /// A start position lies past the end of the address. Maps to `OUT_OF_RANGE`.
    #[error("{field}: {requested} is past the end of the address (last sequence {last}; a stream or group can start at most at {next})", next = .last + 1)]
    PastEnd {
        /// The request field (`start_sequence`).
        field: &'static str,
        /// The sequence asked for.
        requested: u64,
        /// The address's last sequence (0 before the first message).
        last: u64,
    },
    /// CreateGroup for a group that exists with other settings. Maps to `ALREADY_EXISTS`.
    #[error("group: {group:?} already exists with other settings ({existing})")]
    GroupExists {
        /// The group.
        group: String,
        /// Its settings, as the error shows them.
        existing: String,
    },
    /// The named group does not exist on the address. Maps to `NOT_FOUND`.
    #[error("group: no such group {group:?} on address {address:?}")]
    NoSuchGroup {
        /// The address.
        address: String,
        /// The group.
        group: String,
    },
    /// The group was deleted (DeleteGroup) while this call or stream was open. Maps to
    /// `NOT_FOUND`.
    #[error("group deleted")]
    GroupDeleted,
    /// Ack, Nack or ExtendLease on a group that has no acknowledgements (the default group, an
    /// unknown group, or one created without `ack_wait`). Maps to `FAILED_PRECONDITION`.
    #[error("group {group:?}: {reason}")]
    NotAcknowledged {
        /// The group.
        group: String,
        /// Why.
        reason: String,
    },
    /// One message of a SendBatch was refused (and with it the whole batch). Maps to the
    /// inner error's code.
    #[error("messages[{index}]: {error}")]
    InBatch {
        /// The message's index in the request.
        index: usize,
        /// Why it was refused.
        error: Box<Self>,
    },
    /// No or unknown credentials while authentication is on. Maps to `UNAUTHENTICATED`.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The principal may not do this on this address. Maps to `PERMISSION_DENIED`.
    #[error("principal {principal:?} may not {action} {address:?}")]
    PermissionDenied {
        /// The principal's name.
        principal: String,
        /// What it tried (`send to`, `receive from`).
        action: &'static str,
        /// The address or pattern.
        address: String,
    },
    /// The server is shutting down. Maps to `UNAVAILABLE`.
    #[error("server shutting down")]
    ShuttingDown,
    /// The engine in use cannot do this (say, wildcard subscriptions on the Redis engine).
    /// Maps to `UNIMPLEMENTED`.
    #[error("{0} is not supported by this broker's engine")]
    Unsupported(&'static str),
    /// The disk engine could not make a write durable (disk full, I/O error, failed fsync):
    /// nothing of it is visible or kept. Maps to `UNAVAILABLE`; retrying later may succeed.
    #[error("storage: {0}")]
    Storage(String),
}

impl BrokerError {
    /// Shorthand for [`BrokerError::Invalid`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// The gRPC status code this error maps to.
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Invalid { .. } => tonic::Code::InvalidArgument,
            Self::TooLarge { .. } | Self::LimitReached { .. } | Self::BatchTooLarge { .. } => {
                tonic::Code::ResourceExhausted
            }
            Self::AddressDeleted
            | Self::NoSuchAddress(_)
            | Self::NoSuchGroup { .. }
            | Self::GroupDeleted => tonic::Code::NotFound,
            Self::PastEnd { .. } => tonic::Code::OutOfRange,
            Self::GroupExists { .. } => tonic::Code::AlreadyExists,
            Self::NotAcknowledged { .. } => tonic::Code::FailedPrecondition,
            Self::ShuttingDown | Self::Storage(_) => tonic::Code::Unavailable,
            Self::InBatch { error, .. } => error.code(),
            Self::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Self::Unsupported(_) => tonic::Code::Unimplemented,
            Self::PermissionDenied { .. } => tonic::Code::PermissionDenied,
        }
    }
}

impl From<BrokerError> for tonic::Status {
    fn from(e: BrokerError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

//! One error type for the API layer and its one mapping to `tonic::Status`.

use portmesh_core::Rejection;
use portmesh_proto::BadRequest;
use portmesh_raft::{MemberError, ProposeError};
use tonic::{Code, Status};

use crate::{ERROR_METADATA, LEADER_METADATA, OLDEST_REVISION_METADATA};

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request does not parse or validate.
    #[error("{0}")]
    BadRequest(#[from] BadRequest),
    /// The state machine refused the command (nothing changed).
    #[error("{0}")]
    Rejected(#[from] Rejection),
    /// Raft could not take the write or confirm the read.
    #[error("{0}")]
    Raft(#[from] ProposeError),
    /// A membership change was refused.
    #[error("{0}")]
    Member(MemberError),
    /// A watch asked for events older than this node keeps.
    #[error(
        "revision {from} is compacted: this node keeps events from revision {oldest} on; \
         re-read the state (List) and watch from revision {oldest}"
    )]
    Compacted { from: u64, oldest: u64 },
    /// The state machine answered with something the handler did not expect: a bug.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<MemberError> for ApiError {
    fn from(e: MemberError) -> ApiError {
        match e {
            MemberError::Raft(e) => ApiError::Raft(e),
            other => ApiError::Member(other),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let (code, kind) = match &e {
            ApiError::BadRequest(_) => (Code::InvalidArgument, "invalid_argument"),
            ApiError::Rejected(r) => {
                let code = match r.kind() {
                    "invalid_argument" => Code::InvalidArgument,
                    "not_found" => Code::NotFound,
                    "already_exists" => Code::AlreadyExists,
                    "exhausted" => Code::ResourceExhausted,
                    "retry" => Code::Unavailable,
                    _ => Code::FailedPrecondition,
                };
                (code, r.kind())
            }
            ApiError::Raft(p) | ApiError::Member(MemberError::Raft(p)) => match p {
                ProposeError::NotLeader { .. } => (Code::Unavailable, "not_leader"),
                ProposeError::Unavailable(_) => (Code::Unavailable, "unavailable"),
                ProposeError::Timeout(_) | ProposeError::MembershipTimeout(_) => {
                    (Code::DeadlineExceeded, "timeout")
                }
            },
            ApiError::Member(MemberError::NotMember { .. }) => (Code::NotFound, "not_found"),
            ApiError::Member(
                MemberError::LastVoter { .. }
                | MemberError::ForeignCluster { .. }
                | MemberError::NoLiveQuorum { .. },
            ) => (Code::FailedPrecondition, "failed_precondition"),
            ApiError::Compacted { .. } => (Code::OutOfRange, "compacted"),
            ApiError::Internal(_) => (Code::Internal, "internal"),
        };
        let mut status = Status::new(code, e.to_string());
        if let Ok(v) = kind.parse() {
            status.metadata_mut().insert(ERROR_METADATA, v);
        }
        if let ApiError::Raft(ProposeError::NotLeader { leader_addr: Some(addr), .. }) = &e
            && let Ok(v) = addr.parse()
        {
            status.metadata_mut().insert(LEADER_METADATA, v);
        }
        if let ApiError::Compacted { oldest, .. } = &e
            && let Ok(v) = oldest.to_string().parse()
        {
            status.metadata_mut().insert(OLDEST_REVISION_METADATA, v);
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn every_error_maps_to_a_fitting_code_and_category() {
        let cases: Vec<(ApiError, Code, &str)> = vec![
            (BadRequest("x".into()).into(), Code::InvalidArgument, "invalid_argument"),
            (Rejection::UnknownLease { team: "t".into(), id: 1 }.into(), Code::NotFound, "not_found"),
            (
                Rejection::PoolExhausted {
                    team: "t".into(),
                    pool: "p".into(),
                    size: 1,
                    unavailable: 1,
                    detail: String::new(),
                }
                .into(),
                Code::ResourceExhausted,
                "exhausted",
            ),
            (Rejection::NotReserved { port: 2000 }.into(), Code::NotFound, "not_found"),
            (
                Rejection::AlreadyReserved { port: 2000, reason: String::new() }.into(),
                Code::AlreadyExists,
                "already_exists",
            ),
            (
                Rejection::PoolInUse { team: "t".into(), pool: "p".into(), live: 1 }.into(),
                Code::FailedPrecondition,
                "failed_precondition",
            ),
            (
                ProposeError::NotLeader { leader_id: Some(2), leader_addr: Some("10.0.0.2:7400".into()) }
                    .into(),
                Code::Unavailable,
                "not_leader",
            ),
            (ProposeError::Timeout(Duration::from_secs(5)).into(), Code::DeadlineExceeded, "timeout"),
            (MemberError::LastVoter { id: 1 }.into(), Code::FailedPrecondition, "failed_precondition"),
            (MemberError::NotMember { id: 9, members: "1, 2".into() }.into(), Code::NotFound, "not_found"),
            (
                MemberError::Raft(ProposeError::Unavailable("x".into())).into(),
                Code::Unavailable,
                "unavailable",
            ),
            (ApiError::Compacted { from: 3, oldest: 9 }, Code::OutOfRange, "compacted"),
            (ApiError::Internal("x".into()), Code::Internal, "internal"),
        ];
        for (e, code, kind) in cases {
            let msg = e.to_string();
            let s = Status::from(e);
            assert_eq!(s.code(), code, "{msg}");
            assert_eq!(s.message(), msg);
            assert_eq!(s.metadata().get(ERROR_METADATA).and_then(|v| v.to_str().ok()), Some(kind));
        }
        let s = Status::from(ApiError::from(ProposeError::NotLeader {
            leader_id: Some(2),
            leader_addr: Some("10.0.0.2:7400".into()),
        }));
        assert_eq!(s.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()), Some("10.0.0.2:7400"));
        assert!(s.message().contains("the leader is node 2 at 10.0.0.2:7400"));
    }
}

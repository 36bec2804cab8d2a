//! Why the decision path could not decide: no snapshot yet, a request the engine
//! refuses, or a store that failed. Each protocol maps these to its own answers in one
//! place (HTTP statuses, gRPC codes).

use crate::engine::RequestError;
use crate::usage::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    #[error("no policy snapshot loaded yet")]
    NotReady,
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

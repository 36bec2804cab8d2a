//! `entitled`: an entitlement decision sidecar.
//!
//! Data flows one way: policy files → [`policy::raw`] → compiled [`policy::Snapshot`]
//! → [`engine`] decision → response. The engine is pure and synchronous; usage state
//! lives behind [`usage`], time comes in as a parameter ([`time`]).

pub mod audit;
pub mod engine;
pub mod files;
pub mod metrics;
pub mod notices;
pub mod policy;
pub mod policy_test;
pub mod reload;
pub mod segments;
pub mod server;
pub mod shared;
pub mod time;
pub mod usage;

//! `entitled`: an entitlement decision sidecar.
//!
//! Data flows one way: policy files → [`policy::raw`] → compiled [`policy::Snapshot`]
//! → [`engine`] decision → response. The engine is pure and synchronous; usage state
//! lives behind [`usage`], time comes in as a parameter ([`time`]). Every protocol
//! decides through one path, [`decide`] (evaluate, usage step, report); [`admission`]
//! answers API gateways on it, and [`server`] adapts both to HTTP and gRPC.

pub mod admission;
pub mod audit;
pub mod decide;
pub mod engine;
pub mod files;
pub mod ids;
pub mod insights;
pub mod live;
pub mod metrics;
pub mod notices;
pub mod policy;
pub mod portal;
pub mod redact;
pub mod reload;
pub mod rotating_log;
pub mod server;
pub mod sidecar;
pub mod snapshot_cell;
pub mod test_runner;
pub mod time;
pub mod usage;

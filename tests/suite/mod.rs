//! Integration suites.

mod backends;
mod cases;
mod cli;
pub mod durable;
mod envoy;
mod exactness;
mod examples;
mod gateway;
mod incremental;
mod notices;
mod ofrep;
mod portal;
mod props;
pub mod redis;
mod reload;
mod reload_incremental;
mod replicas;
mod schema;
mod server;
mod support;
mod usage_notices;
mod usage_report;
mod writes;

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
mod portal;
mod props;
pub mod redis;
mod reload;
mod reload_incremental;
mod schema;
mod server;
mod support;
mod writes;

//! Integration suites.

mod backends;
mod cases;
pub mod durable;
mod exactness;
mod examples;
mod notices;
mod props;
pub mod redis;
mod reload;
mod schema;
mod server;
mod support;

//! Integration suites.

mod cases;
pub mod durable;
mod exactness;
mod examples;
mod props;
mod reload;
mod server;
mod support;

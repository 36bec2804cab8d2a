//! Integration suites.

mod cases;
mod exactness;
mod examples;
mod props;
mod reload;
mod server;
mod support;

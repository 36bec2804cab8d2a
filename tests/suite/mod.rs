//! Integration suites.

mod cases;
mod exactness;
mod examples;
mod props;

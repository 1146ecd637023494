//! Shared helpers for the integration tests; each test file declares `mod support;`.

pub mod mmdb;

//! Small helpers shared by the benches: percentiles, units, settings.

#![allow(dead_code)]

use std::time::Duration;

/// The `p` quantile (0..=1) of an ascending slice.
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Milliseconds, fractional.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A numeric setting from the environment, or `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Under `cargo test` (no `--bench` flag) the benches do a short smoke run that
/// keeps them working; `cargo bench` passes `--bench`.
pub fn smoke() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

/// Whether the peers run too (not in a smoke run; `PEERS=0` turns them off).
pub fn peers_on() -> bool {
    !smoke() && std::env::var("PEERS").map_or(true, |v| v != "0")
}

//! Counters that every runtime thread (`common::runtime`) updates on a cache line of its own.
//!
//! Statistics that every transaction bumps (`SHOW STATS` totals, transactions in flight)
//! would otherwise be one shared cache line that the threads take from each other on every
//! update. Hand-written (some twenty lines) because the stripe is the thread's core number,
//! known without a lookup: `thread_local::ThreadLocal` finds a thread's slot by a per-thread
//! id and packs slots of different threads next to each other.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::common::runtime::current_core;

/// Stripes per counter: threads beyond this share stripes, which stays correct.
const STRIPES: usize = 16;

#[derive(Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

/// A `u64` counter with `AtomicU64`'s method names. A stripe may wrap below zero when a
/// thread subtracts what another added; the sum is still right.
#[derive(Default)]
pub struct Striped([Stripe; STRIPES]);

impl Striped {
    fn stripe(&self) -> &AtomicU64 {
        &self.0[current_core() % STRIPES].0
    }

    /// Adds `v` on the calling thread's stripe.
    pub fn fetch_add(&self, v: u64, order: Ordering) {
        self.stripe().fetch_add(v, order);
    }

    /// Subtracts `v` on the calling thread's stripe.
    pub fn fetch_sub(&self, v: u64, order: Ordering) {
        self.stripe().fetch_sub(v, order);
    }

    /// The sum of the stripes (read one after the other; a sum caught between one thread's
    /// subtraction and another's addition of the same unit reads as 0, not as a wrapped
    /// value).
    pub fn load(&self, order: Ordering) -> u64 {
        let sum = self.0.iter().fold(0u64, |a, s| a.wrapping_add(s.0.load(order)));
        if sum > i64::MAX as u64 {
            0
        } else {
            sum
        }
    }
}

/// A Prometheus counter every transaction bumps (`sluice_queries_total`): striped too.
impl prometheus_client::metrics::counter::Atomic<u64> for Striped {
    fn inc(&self) -> u64 {
        self.inc_by(1)
    }

    fn inc_by(&self, v: u64) -> u64 {
        self.stripe().fetch_add(v, Ordering::Relaxed);
        // The previous value is not known without summing; nothing uses it.
        0
    }

    fn get(&self) -> u64 {
        self.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Striped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_stripes_of_every_thread() {
        let c = std::sync::Arc::new(Striped::default());
        c.fetch_add(5, Ordering::Relaxed);
        let other = c.clone();
        std::thread::spawn(move || {
            crate::common::runtime::enter_core(3);
            other.fetch_add(2, Ordering::Relaxed);
            other.fetch_sub(6, Ordering::Relaxed);
        })
        .join()
        .unwrap();
        assert_eq!(c.load(Ordering::Relaxed), 1);
        c.fetch_sub(1, Ordering::Relaxed);
        assert_eq!(c.load(Ordering::Relaxed), 0);
    }
}

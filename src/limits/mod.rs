//! Limits on how many agent calls run at once, and how fast.
//!
//! Two layers, both shared by every request in the process, since a provider's limits
//! are per account, not per request:
//!
//! - the process-wide cap ([`Limiter`], by default a [`ConcurrencyLimit`]): agent calls
//!   in flight across all providers;
//! - flow control per provider and model ([`FlowControl`], one [`FlowLane`] each): a
//!   pause when the provider says `Retry-After`, requests- and tokens-per-minute
//!   limits, and an adaptive concurrency limit that finds the provider's capacity.
//!   Calls wait their turn in FIFO order, never past their deadline.

mod adaptive;
pub mod cluster;
mod flow;
mod gcra;
mod lane;
pub(crate) mod shared;

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use adaptive::AdaptiveConfig;
pub use cluster::{Cluster, ClusterSnapshot, LaneShare};
pub use flow::{FlowConfig, FlowControl, RateConfig};
pub use lane::{
    Admitted, Feedback, FlowLane, LanePermit, LaneSnapshot, QueueTimeout, Signal, Turn, WaitCause,
};

/// Grants permission to make one agent call. The permit is held for the call's
/// duration; dropping it frees the slot.
#[async_trait]
pub trait Limiter: Send + Sync + Debug {
    /// Waits until a call may start. Cancel-safe: dropping the future gives up the wait.
    async fn acquire(&self) -> Permit;

    /// A permit if one is free right now, without waiting.
    fn try_acquire(&self) -> Option<Permit>;

    /// The most calls this limiter lets run at once.
    fn limit(&self) -> usize;

    /// Calls running now.
    fn in_flight(&self) -> usize;
}

/// Proof that a call may run; the slot is released on drop.
#[derive(Debug)]
pub struct Permit {
    _guard: Box<dyn Debug + Send + Sync>,
}

impl Permit {
    /// Wraps whatever guard a [`Limiter`] implementation releases on drop.
    pub fn new(guard: impl Debug + Send + Sync + 'static) -> Self {
        Permit {
            _guard: Box::new(guard),
        }
    }
}

/// A fixed concurrency limit: at most `limit` calls at once, first come first served.
///
/// ```
/// use metaorch::limits::{ConcurrencyLimit, Limiter};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let limiter = ConcurrencyLimit::new(2);
/// let a = limiter.acquire().await;
/// let b = limiter.acquire().await;
/// assert_eq!(limiter.in_flight(), 2);
/// drop((a, b));
/// assert_eq!(limiter.in_flight(), 0);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ConcurrencyLimit {
    semaphore: Arc<Semaphore>,
    limit: usize,
}

impl ConcurrencyLimit {
    /// A limiter allowing `limit` calls at once. A limit of 0 is raised to 1, since a
    /// limiter that never grants would hang every request.
    pub fn new(limit: usize) -> Self {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        ConcurrencyLimit {
            semaphore: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }
}

#[async_trait]
impl Limiter for ConcurrencyLimit {
    async fn acquire(&self) -> Permit {
        let permit: OwnedSemaphorePermit = Arc::clone(&self.semaphore)
            .acquire_owned()
            .await
            .expect("the limiter's semaphore is private and never closed");
        Permit::new(permit)
    }

    fn try_acquire(&self) -> Option<Permit> {
        Arc::clone(&self.semaphore)
            .try_acquire_owned()
            .ok()
            .map(Permit::new)
    }

    fn limit(&self) -> usize {
        self.limit
    }

    fn in_flight(&self) -> usize {
        self.limit - self.semaphore.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn third_caller_waits_for_a_release() {
        let limiter = Arc::new(ConcurrencyLimit::new(2));
        let a = limiter.acquire().await;
        let _b = limiter.acquire().await;
        assert!(limiter.try_acquire().is_none());
        let waiter = {
            let limiter = Arc::clone(&limiter);
            tokio::spawn(async move { limiter.acquire().await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        drop(a);
        let _c = waiter.await.unwrap();
        assert_eq!(limiter.in_flight(), 2);
    }

    #[test]
    fn zero_limit_is_raised_to_one() {
        assert_eq!(ConcurrencyLimit::new(0).limit(), 1);
    }
}

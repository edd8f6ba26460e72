//! How long a failing Redis is left alone.

use std::time::Duration;

use tokio::time::Instant;

/// The first pause after a failure.
const FIRST_PAUSE: Duration = Duration::from_secs(1);
/// The longest pause, however long the server stays down.
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// How long a failing server is left alone: [`FIRST_PAUSE`] after a failure, twice
/// as long after each failure that follows, at most [`MAX_PAUSE`]; nothing after a
/// success.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pause {
    /// Failures in a row.
    pub(super) failures: u32,
    /// Until when calls are answered without asking the server.
    until: Option<Instant>,
}

impl Pause {
    /// How long the pause still lasts at `now`, if it does.
    pub(super) fn left(&self, now: Instant) -> Option<Duration> {
        self.until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// A failure at `now`: the pause doubles, never past [`MAX_PAUSE`] nor `max`.
    pub(super) fn failed(&mut self, now: Instant, max: Duration) {
        // Calls that were already under way when a pause began fail as well: they
        // are the same outage, not a longer one.
        if self.left(now).is_some() {
            return;
        }
        let doublings = self.failures.min(5);
        self.failures = self.failures.saturating_add(1);
        let pause = (FIRST_PAUSE * 2u32.pow(doublings)).min(MAX_PAUSE).min(max);
        self.until = Some(now + pause);
    }

    pub(super) fn succeeded(&mut self) {
        *self = Pause::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_doubles_to_its_cap_and_ends_on_success() {
        let t0 = Instant::now();
        let mut pause = Pause::default();
        assert_eq!(pause.left(t0), None);
        let mut now = t0;
        let mut pauses = Vec::new();
        for _ in 0..8 {
            pause.failed(now, Duration::MAX);
            let left = pause.left(now).unwrap();
            pauses.push(left.as_secs());
            // A failure during the pause does not lengthen it.
            pause.failed(now + left / 2, Duration::MAX);
            assert_eq!(pause.left(now), Some(left));
            now += left;
        }
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30, 30]);
        pause.succeeded();
        assert_eq!(pause, Pause::default());
        assert_eq!(pause.left(now), None);
    }
}

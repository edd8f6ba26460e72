//! The breaker's sliding window, kept in the order calls **started**.
//!
//! A window filled in the order calls *finish* is fooled by the speed of failures:
//! errors that come back at once (a 500 in 5 ms) finish before successes that take
//! seconds, so just after a burst of calls the first twenty to finish are mostly the
//! failures, and a 20 % fault rate reads as 60 % — resilience4j's count window opens on
//! exactly that. Here each call takes its place in the window when it starts, counting
//! as "not failed" until it finishes; its result is filled in at its place when it
//! comes, or dropped if the window has moved on. The failure rate is failures over the
//! calls started in the window, which a fast failure cannot inflate: it only fills in
//! its own place sooner. A verdict still needs `minimum_calls` finished calls.
//!
//! Calls that say nothing about the provider's health (429 and 529 answers, calls cut
//! by the request's deadline) leave the window as if they had never started.

use std::collections::VecDeque;

use tokio::time::Instant;

use super::Window;

/// A call's place in the window, to fill in when it finishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ticket {
    /// Count window: its sequence number. Time window: its start second.
    at: u64,
}

/// How a call that took a place in the window ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settled {
    /// It counts for nothing: its place is given up.
    Ignored,
    /// It finished; `failed` and `slow` say how.
    Done { failed: bool, slow: bool },
}

/// What the window holds now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Rates {
    /// Calls that finished and count.
    pub finished: u32,
    /// Failed fraction of the calls started in the window (0 when none).
    pub failure_rate: f64,
    /// Slow fraction of the calls started in the window.
    pub slow_call_rate: f64,
}

/// The counts of some calls: started (and not ignored), finished, failed, slow.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Tally {
    started: u32,
    finished: u32,
    failures: u32,
    slow: u32,
}

impl Tally {
    fn settle(&mut self, settled: Settled) {
        match settled {
            Settled::Ignored => self.started = self.started.saturating_sub(1),
            Settled::Done { failed, slow } => {
                self.finished += 1;
                self.failures += u32::from(failed);
                self.slow += u32::from(slow);
            }
        }
    }

    fn add(&mut self, other: &Tally) {
        self.started += other.started;
        self.finished += other.finished;
        self.failures += other.failures;
        self.slow += other.slow;
    }

    fn subtract(&mut self, other: &Tally) {
        self.started = self.started.saturating_sub(other.started);
        self.finished = self.finished.saturating_sub(other.finished);
        self.failures = self.failures.saturating_sub(other.failures);
        self.slow = self.slow.saturating_sub(other.slow);
    }
}

/// A call's state in a count window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    Running,
    Ignored,
    Done { failed: bool, slow: bool },
}

/// The sliding window's counts.
#[derive(Debug)]
pub(super) enum Counts {
    /// The last `size` calls to start.
    Count {
        size: usize,
        /// The sequence number of `slots[0]`.
        front: u64,
        slots: VecDeque<Slot>,
        totals: Tally,
    },
    /// The calls started in the last `buckets.len()` seconds, one bucket per second.
    Time {
        origin: Instant,
        /// (second, its tally), indexed by second mod length.
        buckets: Vec<(u64, Tally)>,
    },
}

impl Counts {
    pub(super) fn new(window: Window) -> Self {
        match window {
            Window::Count(size) => {
                let size = size.max(1) as usize;
                Counts::Count {
                    size,
                    front: 0,
                    slots: VecDeque::with_capacity(size.min(4096)),
                    totals: Tally::default(),
                }
            }
            Window::Time(period) => Counts::Time {
                origin: Instant::now(),
                buckets: vec![(0, Tally::default()); period.as_secs().clamp(1, 3600) as usize],
            },
        }
    }

    pub(super) fn clear(&mut self) {
        match self {
            Counts::Count {
                front,
                slots,
                totals,
                ..
            } => {
                *front += slots.len() as u64;
                slots.clear();
                *totals = Tally::default();
            }
            Counts::Time { buckets, .. } => buckets.fill((0, Tally::default())),
        }
    }

    /// A call starts: it takes the newest place.
    pub(super) fn start(&mut self, now: Instant) -> Ticket {
        match self {
            Counts::Count {
                size,
                front,
                slots,
                totals,
            } => {
                // The window holds `size` calls that count; ignored ones leave no
                // gap, but are dropped from the front with the rest (and the whole
                // stays bounded should nearly every call be ignored).
                while (totals.started as usize >= *size || slots.len() >= *size * 10)
                    && let Some(old) = slots.pop_front()
                {
                    *front += 1;
                    let mut gone = Tally::default();
                    match old {
                        Slot::Running => gone.started = 1,
                        Slot::Ignored => {}
                        Slot::Done { failed, slow } => {
                            gone.started = 1;
                            gone.settle(Settled::Done { failed, slow });
                        }
                    }
                    totals.subtract(&gone);
                }
                slots.push_back(Slot::Running);
                totals.started += 1;
                Ticket {
                    at: *front + slots.len() as u64 - 1,
                }
            }
            Counts::Time { origin, buckets } => {
                let second = now.saturating_duration_since(*origin).as_secs();
                let len = buckets.len() as u64;
                let bucket = &mut buckets[(second % len) as usize];
                if bucket.0 != second {
                    *bucket = (second, Tally::default());
                }
                bucket.1.started += 1;
                Ticket { at: second }
            }
        }
    }

    /// Fills in a call's result at its place, if the window still holds it.
    pub(super) fn settle(&mut self, ticket: Ticket, settled: Settled) {
        match self {
            Counts::Count {
                front,
                slots,
                totals,
                ..
            } => {
                let Some(slot) = ticket
                    .at
                    .checked_sub(*front)
                    .and_then(|i| slots.get_mut(usize::try_from(i).ok()?))
                else {
                    return; // it has slid out of the window
                };
                if *slot != Slot::Running {
                    return;
                }
                *slot = match settled {
                    Settled::Ignored => Slot::Ignored,
                    Settled::Done { failed, slow } => Slot::Done { failed, slow },
                };
                totals.settle(settled);
            }
            Counts::Time { buckets, .. } => {
                let len = buckets.len() as u64;
                let bucket = &mut buckets[(ticket.at % len) as usize];
                if bucket.0 == ticket.at {
                    bucket.1.settle(settled);
                }
            }
        }
    }

    /// The window's rates as of `now`.
    pub(super) fn rates(&self, now: Instant) -> Rates {
        let tally = match self {
            Counts::Count { totals, .. } => *totals,
            Counts::Time { origin, buckets } => {
                let second = now.saturating_duration_since(*origin).as_secs();
                let len = buckets.len() as u64;
                let mut tally = Tally::default();
                for (s, t) in buckets {
                    if s + len > second {
                        tally.add(t);
                    }
                }
                tally
            }
        };
        let rate = |n: u32| {
            if tally.started == 0 {
                0.0
            } else {
                f64::from(n) / f64::from(tally.started)
            }
        };
        Rates {
            finished: tally.finished,
            failure_rate: rate(tally.failures),
            slow_call_rate: rate(tally.slow),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn done(failed: bool) -> Settled {
        Settled::Done {
            failed,
            slow: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fast_failures_cannot_outweigh_slower_calls_that_started_first() {
        let now = Instant::now();
        let mut w = Counts::new(Window::Count(100));
        // Ten calls start; the two that fail come back first.
        let tickets: Vec<_> = (0..10).map(|_| w.start(now)).collect();
        w.settle(tickets[3], done(true));
        w.settle(tickets[7], done(true));
        let r = w.rates(now);
        assert_eq!((r.finished, r.failure_rate), (2, 0.2));
        for t in tickets {
            w.settle(t, done(false)); // the failures are not counted twice
        }
        assert_eq!(w.rates(now).failure_rate, 0.2);
    }

    #[tokio::test(start_paused = true)]
    async fn count_window_drops_the_oldest_start() {
        let now = Instant::now();
        let mut w = Counts::new(Window::Count(4));
        let old = w.start(now);
        w.settle(old, done(true));
        for _ in 0..4 {
            let t = w.start(now);
            w.settle(t, done(false));
        }
        let r = w.rates(now);
        assert_eq!((r.finished, r.failure_rate), (4, 0.0));
        // A result for a call that slid out is dropped.
        let gone = Ticket { at: 0 };
        w.settle(gone, done(true));
        assert_eq!(w.rates(now).failure_rate, 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn ignored_calls_leave_room_for_calls_that_count() {
        let now = Instant::now();
        let mut w = Counts::new(Window::Count(10));
        // Mostly 429s (ignored), the rest 500s: ten 500s still fill the window.
        for n in 0..100 {
            let t = w.start(now);
            w.settle(
                t,
                if n % 10 == 0 {
                    done(true)
                } else {
                    Settled::Ignored
                },
            );
        }
        // (Nine or ten: a call takes its place before anyone knows it will be ignored.)
        let r = w.rates(now);
        assert!(r.finished >= 9 && r.failure_rate == 1.0, "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn ignored_calls_give_up_their_place() {
        let now = Instant::now();
        let mut w = Counts::new(Window::Count(10));
        let a = w.start(now);
        let b = w.start(now);
        w.settle(a, Settled::Ignored);
        w.settle(b, done(true));
        let r = w.rates(now);
        assert_eq!((r.finished, r.failure_rate), (1, 1.0));
    }

    #[tokio::test(start_paused = true)]
    async fn time_window_counts_calls_by_their_start_second() {
        let t0 = Instant::now();
        let mut w = Counts::new(Window::Time(Duration::from_secs(5)));
        let early = w.start(t0);
        tokio::time::advance(Duration::from_secs(2)).await;
        let late = w.start(Instant::now());
        w.settle(early, done(true));
        w.settle(late, done(false));
        assert_eq!(w.rates(Instant::now()).failure_rate, 0.5);
        tokio::time::advance(Duration::from_secs(4)).await;
        let r = w.rates(Instant::now());
        assert_eq!(
            (r.finished, r.failure_rate),
            (1, 0.0),
            "the early call slid out"
        );
        // A result for a second that has slid out is dropped.
        w.settle(early, done(true));
        assert_eq!(w.rates(Instant::now()).failure_rate, 0.0);
    }
}

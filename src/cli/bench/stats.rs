//! The arithmetic of the benchmark: percentiles, the critical path of a request under
//! a concurrency limit, call bursts, and the process's CPU time and peak memory.

use std::time::Duration;

/// The `p`-th percentile (0–100) of `sorted`, by nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The mean of `values` (0 for none).
pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// The shortest time these calls, dispatched in this order, can take on `slots`
/// concurrency slots: the makespan of the list schedule that a FIFO semaphore produces.
/// With as many slots as calls, that is the slowest call; with one, the sum.
pub fn critical_path(calls: &[Duration], slots: usize) -> Duration {
    let slots = slots.max(1);
    if slots >= calls.len() {
        return calls.iter().copied().max().unwrap_or_default();
    }
    let mut free_at = vec![Duration::ZERO; slots];
    for &call in calls {
        let (earliest, _) = free_at
            .iter()
            .enumerate()
            .min_by_key(|(_, t)| **t)
            .expect("at least one slot");
        free_at[earliest] += call;
    }
    free_at.into_iter().max().unwrap_or_default()
}

/// The most call starts within any window of `window` (`starts` in any order).
pub fn burst(starts: &mut [Duration], window: Duration) -> usize {
    starts.sort_unstable();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..starts.len() {
        while starts[hi] - starts[lo] >= window {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// CPU time (user + system) this process has used, and its peak resident set, in MB.
pub fn usage() -> (Duration, f64) {
    #[cfg(unix)]
    {
        // SAFETY: getrusage writes into the struct we pass and reads nothing else.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
            let tv = |t: libc::timeval| {
                Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
            };
            // Linux reports ru_maxrss in KiB.
            return (
                tv(ru.ru_utime) + tv(ru.ru_stime),
                ru.ru_maxrss as f64 / 1024.0,
            );
        }
    }
    (Duration::ZERO, 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn critical_path_is_the_list_schedule_makespan() {
        let calls = ms(&[1000, 2000, 500, 1500, 700, 1200]);
        assert_eq!(critical_path(&calls, 6), Duration::from_millis(2000));
        assert_eq!(critical_path(&calls, 1), Duration::from_millis(6900));
        // Four slots: 1000, 2000, 500, 1500 start at 0; 700 takes the slot free at 500
        // (ends 1200); 1200 takes the slot free at 1000 (ends 2200).
        assert_eq!(critical_path(&calls, 4), Duration::from_millis(2200));
        assert_eq!(critical_path(&[], 4), Duration::ZERO);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(mean(&[1.0, 2.0, 3.0]), 2.0);
    }

    #[test]
    fn burst_counts_starts_in_the_busiest_window() {
        let mut starts = ms(&[0, 100, 200, 1500, 1600, 1700, 1800, 3000]);
        assert_eq!(burst(&mut starts, Duration::from_secs(1)), 4);
        assert_eq!(burst(&mut [], Duration::from_secs(1)), 0);
    }
}

//! A scope's `per_minute` and `per_day`: reserved before a call is forwarded, never charged
//! after it.
//!
//! Each limit is a sliding window over the calls themselves (the instants of the last N
//! reservations), so it is exact: no 60 seconds ever hold more than `per_minute` calls, and no
//! burst of twice the limit fits across a window's edge as with fixed windows. A call takes a
//! place in every window of its scope at once, under one lock, or in none: sixteen clients
//! racing for the last place get one call through, not sixteen. A call that then fails
//! upstream keeps its place (the upstream may have acted on it; a failing call retried in a
//! loop must not be free).

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// Which limit a call ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    PerMinute,
    PerDay,
}

impl Which {
    /// As in audit lines and the 429 answer: `per_minute`, `per_day`.
    pub fn name(self) -> &'static str {
        match self {
            Self::PerMinute => "per_minute",
            Self::PerDay => "per_day",
        }
    }
}

/// A refused reservation: which limit, and when a place frees up (the `Retry-After`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub which: Which,
    pub retry_after: Duration,
}

/// One sliding window: at most `max` calls in any `span`.
#[derive(Debug)]
struct Window {
    max: u32,
    span: Duration,
    /// Instants of the calls inside the window, oldest first; never more than `max`.
    calls: VecDeque<Instant>,
}

impl Window {
    fn new(max: u32, span: Duration) -> Self {
        Self {
            max,
            span,
            calls: VecDeque::new(),
        }
    }

    fn expire(&mut self, now: Instant) {
        while self
            .calls
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= self.span)
        {
            self.calls.pop_front();
        }
    }

    /// None when a place is free at `now`, else how long until one is.
    fn full_for(&mut self, now: Instant) -> Option<Duration> {
        self.expire(now);
        if (self.calls.len() as u64) < u64::from(self.max) {
            return None;
        }
        let oldest = self.calls.front().copied().unwrap_or(now);
        Some(
            self.span
                .saturating_sub(now.saturating_duration_since(oldest)),
        )
    }

    fn left(&mut self, now: Instant) -> u32 {
        self.expire(now);
        self.max
            .saturating_sub(u32::try_from(self.calls.len()).unwrap_or(u32::MAX))
    }
}

/// The limits of one scope of one agent.
#[derive(Debug)]
pub struct ScopeLimits {
    minute: Option<Window>,
    day: Option<Window>,
}

impl ScopeLimits {
    pub fn new(per_minute: Option<u32>, per_day: Option<u32>) -> Self {
        Self {
            minute: per_minute.map(|m| Window::new(m, Duration::from_secs(60))),
            day: per_day.map(|d| Window::new(d, Duration::from_secs(24 * 3600))),
        }
    }

    /// Takes a place in every window at `now`, or in none and says which was full.
    pub fn reserve(&mut self, now: Instant) -> Result<(), Hit> {
        // Both are checked before either is charged: a call refused by the day's limit must
        // not use up a place of the minute's.
        for (w, which) in [
            (self.minute.as_mut(), Which::PerMinute),
            (self.day.as_mut(), Which::PerDay),
        ] {
            if let Some(retry_after) = w.and_then(|w| w.full_for(now)) {
                return Err(Hit { which, retry_after });
            }
        }
        for w in [self.minute.as_mut(), self.day.as_mut()]
            .into_iter()
            .flatten()
        {
            w.calls.push_back(now);
        }
        Ok(())
    }

    /// Places left now in each window (None: no such limit), for status.
    pub fn left(&mut self, now: Instant) -> (Option<u32>, Option<u32>) {
        (
            self.minute.as_mut().map(|w| w.left(now)),
            self.day.as_mut().map(|w| w.left(now)),
        )
    }

    /// The same limits with new maxima (a reload), keeping the calls already made: a reload
    /// is no way to reset a budget.
    pub fn reconfigure(&mut self, per_minute: Option<u32>, per_day: Option<u32>) {
        fn carry(old: Option<Window>, max: Option<u32>, span: Duration) -> Option<Window> {
            let mut w = Window::new(max?, span);
            if let Some(old) = old {
                w.calls = old.calls;
            }
            Some(w)
        }
        self.minute = carry(self.minute.take(), per_minute, Duration::from_secs(60));
        self.day = carry(self.day.take(), per_day, Duration::from_secs(24 * 3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_holds_exactly_its_maximum_and_frees_places_as_they_age() {
        let t0 = Instant::now();
        let mut l = ScopeLimits::new(Some(3), None);
        for i in 0..3 {
            l.reserve(t0 + Duration::from_secs(i)).expect("place");
        }
        let hit = l.reserve(t0 + Duration::from_secs(10)).expect_err("full");
        assert_eq!(hit.which, Which::PerMinute);
        // The first call (at t0) leaves the window at t0 + 60 s.
        assert_eq!(hit.retry_after, Duration::from_secs(50));
        assert!(l.reserve(t0 + Duration::from_secs(59)).is_err());
        l.reserve(t0 + Duration::from_secs(60))
            .expect("one place freed");
        assert!(l.reserve(t0 + Duration::from_secs(60)).is_err());
    }

    #[test]
    fn no_burst_of_twice_the_limit_across_a_window_edge() {
        let t0 = Instant::now();
        let mut l = ScopeLimits::new(Some(10), None);
        let late = t0 + Duration::from_millis(59_900);
        for _ in 0..10 {
            l.reserve(late).expect("place");
        }
        // A fixed window would reopen at 60 s; here the calls of 59.9 s still count.
        assert!(l.reserve(t0 + Duration::from_millis(60_100)).is_err());
    }

    #[test]
    fn a_call_refused_by_the_day_takes_no_place_of_the_minute() {
        let t0 = Instant::now();
        let mut l = ScopeLimits::new(Some(5), Some(2));
        l.reserve(t0).expect("1");
        l.reserve(t0).expect("2");
        let hit = l.reserve(t0).expect_err("day is full");
        assert_eq!(hit.which, Which::PerDay);
        assert_eq!(l.left(t0), (Some(3), Some(0)));
    }

    #[test]
    fn a_reload_keeps_the_calls_made() {
        let t0 = Instant::now();
        let mut l = ScopeLimits::new(Some(5), None);
        for _ in 0..4 {
            l.reserve(t0).expect("place");
        }
        l.reconfigure(Some(4), Some(100));
        assert!(l.reserve(t0).is_err());
        assert_eq!(l.left(t0), (Some(0), Some(100)));
    }
}

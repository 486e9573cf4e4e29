//! Rates, learned baselines and the circuit breaker of one agent (pure logic, no I/O).
//!
//! Every tick the daemon feeds the agent's kernel counters in. Per signal (connects, sends,
//! syscalls, execs, denied attempts, distinct destinations, outbound bytes) the rate is measured over the last `window` (sliding, so a burst is seen
//! within a tick, not at the end of a window). Once per window the baseline learns from that
//! window's rate with an EWMA, except from windows that look abnormal (above twice the
//! baseline): an attacker who ramps up slowly does not teach the baseline his new normal faster
//! than doubling per window. After `warmup`, a rate above `trip_factor` x baseline and above
//! `min_rate` (for bytes: `min_bytes_rate`) trips the breaker.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use crate::config::{Action, Breaker as BreakerConfig};

/// The signals a breaker watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Connects,
    Sends,
    Syscalls,
    Execs,
    /// Denied egress attempts: an agent probing what it may reach.
    Denied,
    /// Distinct destinations contacted per second: fan-out, scanning.
    Destinations,
    /// Outbound bytes per second: an agent that suddenly uploads far more than it ever did.
    Bytes,
    /// Calls per second through the API gateway, all scopes: 500 calls a minute over one
    /// keep-alive connection are one `connect` to every other signal.
    ApiCalls,
}

/// How many signals there are (the length of every per-signal array).
pub const SIGNALS: usize = 8;

impl Signal {
    pub const ALL: [Self; SIGNALS] = [
        Self::Connects,
        Self::Sends,
        Self::Syscalls,
        Self::Execs,
        Self::Denied,
        Self::Destinations,
        Self::Bytes,
        Self::ApiCalls,
    ];

    /// Which signals the kernel counts for an agent: `syscalls` only with the syscall monitor
    /// (`monitor.syscalls`) and `destinations` only with a breaker (each costs every call of
    /// the agent something, and only a breaker judges destinations); the rest always.
    pub fn counted(monitor_syscalls: bool, breaker: bool) -> [bool; SIGNALS] {
        Self::ALL.map(|s| match s {
            Self::Syscalls => monitor_syscalls,
            Self::Destinations => breaker,
            _ => true,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Connects => "connects",
            Self::Sends => "sends",
            Self::Syscalls => "syscalls",
            Self::Execs => "execs",
            Self::Denied => "denied",
            Self::Destinations => "destinations",
            Self::Bytes => "bytes",
            Self::ApiCalls => "api_calls",
        }
    }
}

/// EWMA weight of a new window in the baseline.
const ALPHA: f64 = 0.2;
/// A window above this multiple of the baseline is not learned from.
const LEARN_CEILING: f64 = 2.0;

#[derive(Debug, Clone, Default)]
struct Track {
    rate: f64,
    baseline: Option<f64>,
}

impl Track {
    fn learn(&mut self) {
        match self.baseline {
            None => self.baseline = Some(self.rate),
            Some(b) if self.rate <= LEARN_CEILING * b.max(1.0) => {
                self.baseline = Some(b + ALPHA * (self.rate - b));
            }
            Some(_) => {}
        }
    }
}

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum State {
    /// Learning (until `warmup` has passed), then judging.
    Closed,
    /// Tripped at `since`; the action is in force.
    Open { since: Instant },
    /// Cool-down over, action lifted; the next window decides.
    HalfOpen { since: Instant },
}

/// A change the daemon must act on (and audit).
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    Tripped {
        signal: Signal,
        rate: f64,
        baseline: f64,
        action: Action,
    },
    HalfOpen,
    Closed,
}

/// Rates, baselines and (when configured) the breaker of one agent.
#[derive(Debug, Clone)]
pub struct Monitor {
    config: Option<BreakerConfig>,
    window: Duration,
    started: Instant,
    last_learned: Instant,
    tracks: [Track; SIGNALS],
    /// (time, cumulative counts), oldest first, covering at least one window: one list for
    /// every signal (they are sampled together; a list each cost 8 times the work, ten times
    /// a second per agent).
    samples: VecDeque<(Instant, [u64; SIGNALS])>,
    state: State,
    /// How long an open breaker waits before half-opening (without require_approval).
    cooldown: Duration,
    /// The signals the kernel counts for the agent ([`Signal::counted`]); the others have no
    /// rate and are never judged.
    counted: [bool; SIGNALS],
    /// When a signal began to be counted after the monitor started (a reload turned it on):
    /// it is judged once it has learned for `warmup` from then, not against a baseline
    /// learned while it read 0.
    counted_since: [Option<Instant>; SIGNALS],
}

impl Monitor {
    /// A monitor starting at `now`; `config` None measures rates and baselines but never trips.
    pub fn new(config: Option<BreakerConfig>, now: Instant) -> Self {
        let window = config.map_or(Duration::from_secs(1), |c| c.window);
        Self {
            cooldown: config.map_or(Duration::from_secs(30), |c| c.cooldown),
            config,
            window,
            started: now,
            last_learned: now,
            tracks: Default::default(),
            samples: VecDeque::new(),
            state: State::Closed,
            counted: [true; SIGNALS],
            counted_since: [None; SIGNALS],
        }
    }

    /// As [`Self::new`], for an agent whose kernel counts only the signals `counted` picks.
    pub fn counting(mut self, counted: [bool; SIGNALS]) -> Self {
        self.counted = counted;
        self
    }

    /// The signals counted changed at `now` (a reload): a signal no longer counted has no
    /// rate or baseline; one counted anew learns its baseline from now on, and is judged once
    /// it has learned for `warmup`.
    pub fn set_counted(&mut self, counted: [bool; SIGNALS], now: Instant) {
        for (i, &on) in counted.iter().enumerate() {
            if on == self.counted[i] {
                continue;
            }
            self.tracks[i] = Track::default();
            self.counted_since[i] = on.then_some(now);
        }
        self.counted = counted;
    }

    /// Does the kernel count `signal` for this agent?
    pub fn counts(&self, signal: Signal) -> bool {
        self.counted[signal as usize]
    }

    /// [`Self::rate`] of a signal the kernel counts; None for one it does not.
    pub fn counted_rate(&self, signal: Signal) -> Option<f64> {
        self.counts(signal).then(|| self.rate(signal))
    }

    /// [`Self::baseline`] of a signal the kernel counts; None for one it does not.
    pub fn counted_baseline(&self, signal: Signal) -> Option<f64> {
        self.baseline(signal).filter(|_| self.counts(signal))
    }

    /// Takes a new configuration, keeping what was learned.
    pub fn reconfigure(&mut self, config: Option<BreakerConfig>) {
        self.window = config.map_or(Duration::from_secs(1), |c| c.window);
        self.cooldown = config.map_or(Duration::from_secs(30), |c| c.cooldown);
        self.config = config;
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open { .. })
    }

    pub fn config(&self) -> Option<&BreakerConfig> {
        self.config.as_ref()
    }

    /// Current rate of `signal`, per second.
    pub fn rate(&self, signal: Signal) -> f64 {
        self.tracks[signal as usize].rate
    }

    /// Learned baseline of `signal`, per second (None until a window has passed).
    pub fn baseline(&self, signal: Signal) -> Option<f64> {
        self.tracks[signal as usize].baseline
    }

    /// How many times its baseline the most abnormal signal runs at (1.0 is normal).
    pub fn anomaly_score(&self) -> f64 {
        self.tracks
            .iter()
            .zip(self.counted)
            .filter(|(_, counted)| *counted)
            .map(|(t, _)| t.rate / t.baseline.unwrap_or(t.rate).max(1.0))
            .fold(0.0, f64::max)
    }

    /// The breaker is open already (the kernel says so after a daemon restart).
    pub fn force_open(&mut self, now: Instant) {
        self.state = State::Open { since: now };
    }

    /// A human closed the breaker (`approve`) at `now`, when the cumulative counts were
    /// `counts`. Either way the rate windows restart from `counts`, so nothing done before the
    /// approval is judged again. The human vouched for what the agent does now: by default the
    /// baselines are forgotten and learned again from now on (warmup again); with
    /// `keep_baseline` they stay and the agent is judged against them at once.
    pub fn approve(&mut self, now: Instant, counts: [u64; SIGNALS], keep_baseline: bool) {
        self.state = State::Closed;
        self.samples.clear();
        self.samples.push_back((now, counts));
        for t in &mut self.tracks {
            t.rate = 0.0;
            if !keep_baseline {
                t.baseline = None;
            }
        }
        self.last_learned = now;
        if !keep_baseline {
            self.started = now;
        }
    }

    /// Feeds the cumulative counts (indexed like [`Signal::ALL`]) at `now`.
    pub fn observe(&mut self, now: Instant, counts: [u64; SIGNALS]) -> Option<Transition> {
        self.samples.push_back((now, counts));
        // Keep one sample at or before now - window, so the rate spans a whole window.
        while self.samples.len() > 2 && self.samples[1].0 + self.window <= now {
            self.samples.pop_front();
        }
        if let Some(&(t0, c0)) = self.samples.front() {
            let span = now.duration_since(t0).as_secs_f64();
            for ((t, c), c0) in self.tracks.iter_mut().zip(counts).zip(c0) {
                t.rate = if span > 0.0 {
                    c.saturating_sub(c0) as f64 / span
                } else {
                    0.0
                };
            }
        }
        let window_done = now.duration_since(self.last_learned) >= self.window;
        let Some(cfg) = self.config else {
            if window_done {
                self.learn_all(now);
            }
            return None;
        };
        let warm = now.duration_since(self.started) >= cfg.warmup;
        match self.state {
            State::Closed => {
                if warm && let Some(t) = self.trip(&cfg, now) {
                    return Some(t);
                }
                if window_done {
                    self.learn_all(now);
                }
                None
            }
            State::Open { since } => {
                if !cfg.require_approval && now.duration_since(since) >= self.cooldown {
                    self.state = State::HalfOpen { since: now };
                    return Some(Transition::HalfOpen);
                }
                None
            }
            State::HalfOpen { since } => {
                if let Some(t) = self.trip(&cfg, now) {
                    return Some(t);
                }
                if now.duration_since(since) >= self.window {
                    self.state = State::Closed;
                    return Some(Transition::Closed);
                }
                None
            }
        }
    }

    /// Until when observing this monitor with the counts it saw last would change nothing
    /// but its samples' times: while it is closed (or has no breaker), every sample holds the
    /// last counts (so every rate stays 0 and nothing can trip: the floors are at least 0),
    /// and no window ends before the time returned. None when it is not quiet. The tick skips
    /// such a monitor while its counts stay put, and [`Self::skipped`] makes up for it.
    pub fn quiet_until(&self) -> Option<Instant> {
        let last = self.samples.back()?.1;
        let quiet = self.state == State::Closed
            && self.samples.iter().all(|(_, c)| *c == last)
            && self.tracks.iter().all(|t| t.rate == 0.0)
            && self
                .config
                .is_none_or(|c| c.min_rate >= 0.0 && c.min_bytes_rate >= 0.0);
        quiet.then(|| self.last_learned + self.window)
    }

    /// The ticks at `times` (in order) this monitor was not shown because it was quiet
    /// ([`Self::quiet_until`], which must still hold at each) and its counts had not moved.
    /// Exactly what observing it at each would have done: keep the samples a window needs.
    pub fn skipped(&mut self, times: impl Iterator<Item = Instant>) {
        let Some(&(_, last)) = self.samples.back() else {
            return;
        };
        for t in times {
            self.samples.push_back((t, last));
            while self.samples.len() > 2 && self.samples[1].0 + self.window <= t {
                self.samples.pop_front();
            }
        }
    }

    fn learn_all(&mut self, now: Instant) {
        for t in &mut self.tracks {
            t.learn();
        }
        self.last_learned = now;
    }

    fn trip(&mut self, cfg: &BreakerConfig, now: Instant) -> Option<Transition> {
        for signal in Signal::ALL {
            let i = signal as usize;
            let learning =
                self.counted_since[i].is_some_and(|since| now.duration_since(since) < cfg.warmup);
            if !self.counted[i] || learning {
                continue;
            }
            let t = &self.tracks[i];
            let baseline = t.baseline.unwrap_or(0.0);
            // Bytes come thousands at a time: they have a floor of their own.
            let floor = if signal == Signal::Bytes {
                cfg.min_bytes_rate
            } else {
                cfg.min_rate
            };
            if t.rate > cfg.trip_factor * baseline && t.rate > floor {
                self.state = State::Open { since: now };
                return Some(Transition::Tripped {
                    signal,
                    rate: t.rate,
                    baseline,
                    action: cfg.action,
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            warmup: Duration::from_secs(2),
            window: Duration::from_millis(500),
            trip_factor: 5.0,
            min_rate: 20.0,
            min_bytes_rate: 65536.0,
            action: Action::Freeze,
            require_approval: true,
            cooldown: Duration::from_secs(3),
        }
    }

    /// Runs `rate` connects per second for `secs`, ticking every 100 ms; returns transitions.
    fn run(
        m: &mut Monitor,
        t: &mut Instant,
        count: &mut f64,
        rate: f64,
        secs: f64,
    ) -> Vec<Transition> {
        let mut out = Vec::new();
        for _ in 0..(secs * 10.0) as usize {
            *t += Duration::from_millis(100);
            *count += rate / 10.0;
            out.extend(m.observe(*t, [*count as u64, 0, 0, 0, 0, 0, 0, 0]));
        }
        out
    }

    /// Runs `rate` distinct destinations per second (and 10 connects) for `secs`, ticking
    /// every 100 ms; returns transitions.
    fn fan_out(
        m: &mut Monitor,
        t: &mut Instant,
        counts: &mut [f64; 2],
        rate: f64,
        secs: f64,
    ) -> Vec<Transition> {
        let mut out = Vec::new();
        for _ in 0..(secs * 10.0) as usize {
            *t += Duration::from_millis(100);
            counts[0] += 1.0;
            counts[1] += rate / 10.0;
            let d = counts[1] as u64;
            out.extend(m.observe(*t, [counts[0] as u64, 0, 0, 0, 0, d, 0, 0]));
        }
        out
    }

    /// A signal the kernel does not count has no rate that could trip (whatever its count
    /// does); one counted from a reload on is judged only once it has learned for `warmup`
    /// from then, not against the 0 it read before.
    #[test]
    fn a_signal_is_judged_only_while_counted_and_learned_anew_when_counting_starts() {
        let t0 = Instant::now();
        let mut t = t0;
        let mut c = [0.0; 2];
        let no_destinations = Signal::counted(false, false);
        let mut m = Monitor::new(Some(cfg()), t0).counting(no_destinations);
        assert!(!m.counts(Signal::Destinations) && m.counts(Signal::Connects));
        // Stale or moving, an uncounted signal is never judged.
        assert!(fan_out(&mut m, &mut t, &mut c, 0.0, 5.0).is_empty());
        assert!(fan_out(&mut m, &mut t, &mut c, 500.0, 3.0).is_empty());
        assert_eq!(m.baseline(Signal::Destinations), Some(0.0));
        // Counted from now on: a rate far above the 0 learned before does not trip while it
        // learns (warmup, 2 s), and what it learns is the new rate.
        m.set_counted(Signal::counted(false, true), t);
        assert_eq!(m.baseline(Signal::Destinations), None);
        assert_eq!(m.rate(Signal::Destinations), 0.0);
        assert!(fan_out(&mut m, &mut t, &mut c, 100.0, 4.0).is_empty());
        let b = m.baseline(Signal::Destinations).expect("learned");
        assert!((b - 100.0).abs() < 10.0, "{b}");
        // Judged now: ten times that trips on destinations.
        let tr = fan_out(&mut m, &mut t, &mut c, 1000.0, 1.0);
        assert!(
            matches!(
                tr.as_slice(),
                [Transition::Tripped {
                    signal: Signal::Destinations,
                    ..
                }]
            ),
            "{tr:?}"
        );
        // No longer counted: no rate, no baseline.
        m.set_counted(no_destinations, t);
        assert_eq!(
            (
                m.rate(Signal::Destinations),
                m.baseline(Signal::Destinations)
            ),
            (0.0, None)
        );
    }

    #[test]
    fn steady_load_never_trips_and_is_learned() {
        let t0 = Instant::now();
        let (mut t, mut n) = (t0, 0.0);
        let mut m = Monitor::new(Some(cfg()), t0);
        assert!(run(&mut m, &mut t, &mut n, 10.0, 10.0).is_empty());
        let b = m.baseline(Signal::Connects).unwrap();
        assert!((b - 10.0).abs() < 1.0, "{b}");
        assert!((m.rate(Signal::Connects) - 10.0).abs() < 1.0);
    }

    #[test]
    fn a_burst_trips_within_a_few_ticks_and_stays_open_until_approved() {
        let t0 = Instant::now();
        let (mut t, mut n) = (t0, 0.0);
        let mut m = Monitor::new(Some(cfg()), t0);
        run(&mut m, &mut t, &mut n, 10.0, 5.0);
        let before = t;
        let tr = run(&mut m, &mut t, &mut n, 300.0, 1.0);
        let Some(Transition::Tripped {
            signal,
            rate,
            baseline,
            action,
        }) = tr.first().cloned()
        else {
            panic!("no trip: {tr:?}");
        };
        assert_eq!((signal, action), (Signal::Connects, Action::Freeze));
        assert!(
            rate > 50.0 && (baseline - 10.0).abs() < 1.0,
            "{rate} {baseline}"
        );
        assert_eq!(tr.len(), 1);
        assert!(
            matches!(m.state(), State::Open { since } if since.duration_since(before) <= Duration::from_millis(300))
        );
        // require_approval: no half-open however long it waits.
        assert!(run(&mut m, &mut t, &mut n, 0.0, 10.0).is_empty());
        m.approve(t, [n as u64, 0, 0, 0, 0, 0, 0, 0], true);
        assert_eq!(m.state(), State::Closed);
    }

    #[test]
    fn approve_relearns_from_now_and_the_same_rate_no_longer_trips() {
        let t0 = Instant::now();
        let (mut t, mut n) = (t0, 0.0);
        let mut m = Monitor::new(Some(cfg()), t0);
        run(&mut m, &mut t, &mut n, 10.0, 5.0);
        assert!(!run(&mut m, &mut t, &mut n, 300.0, 0.5).is_empty());
        m.approve(t, [n as u64, 0, 0, 0, 0, 0, 0, 0], false);
        assert_eq!(m.baseline(Signal::Connects), None);
        // The burst rate goes on: judged neither during the new warmup nor after it, since the
        // baseline learned it.
        assert_eq!(run(&mut m, &mut t, &mut n, 300.0, 6.0), vec![]);
        let b = m.baseline(Signal::Connects).unwrap();
        assert!((b - 300.0).abs() < 30.0, "{b}");
    }

    #[test]
    fn approve_keeping_the_baseline_judges_only_calls_after_it() {
        let t0 = Instant::now();
        let (mut t, mut n) = (t0, 0.0);
        let mut m = Monitor::new(Some(cfg()), t0);
        run(&mut m, &mut t, &mut n, 10.0, 5.0);
        assert!(!run(&mut m, &mut t, &mut n, 300.0, 0.5).is_empty());
        // The burst's calls are still inside the window, but approval restarts the window.
        m.approve(t, [n as u64, 0, 0, 0, 0, 0, 0, 0], true);
        assert_eq!(run(&mut m, &mut t, &mut n, 10.0, 2.0), vec![]);
        let b = m.baseline(Signal::Connects).unwrap();
        assert!((b - 10.0).abs() < 2.0, "{b}");
        // A burst after the approval trips again at once (no new warmup).
        let tr = run(&mut m, &mut t, &mut n, 300.0, 0.5);
        assert!(
            matches!(tr.first(), Some(Transition::Tripped { .. })),
            "{tr:?}"
        );
    }

    #[test]
    fn every_signal_is_judged() {
        for (i, signal) in Signal::ALL.into_iter().enumerate() {
            let t0 = Instant::now();
            let mut t = t0;
            let mut m = Monitor::new(Some(cfg()), t0);
            let mut counts = [0u64; SIGNALS];
            let mut tr = Vec::new();
            for step in 0..40 {
                t += Duration::from_millis(100);
                // 10/s for 3 s, then 300/s (bytes: 10 KB/s, then 300 KB/s, above its floor).
                let unit = if signal == Signal::Bytes { 1000 } else { 1 };
                counts[i] += unit * if step < 30 { 1 } else { 30 };
                tr.extend(m.observe(t, counts));
            }
            assert!(
                matches!(tr.first(), Some(Transition::Tripped { signal: s, .. }) if *s == signal),
                "{signal:?}: {tr:?}"
            );
        }
    }

    #[test]
    fn nothing_is_judged_during_warmup() {
        let t0 = Instant::now();
        let (mut t, mut n) = (t0, 0.0);
        let mut m = Monitor::new(Some(cfg()), t0);
        assert!(run(&mut m, &mut t, &mut n, 500.0, 1.9).is_empty());
    }

    #[test]
    fn without_approval_it_half_opens_after_cooldown_and_closes_when_calm() {
        let t0 = Instant::now();
        let (mut t, mut n) = (t0, 0.0);
        let mut m = Monitor::new(
            Some(BreakerConfig {
                require_approval: false,
                ..cfg()
            }),
            t0,
        );
        run(&mut m, &mut t, &mut n, 10.0, 3.0);
        let tr = run(&mut m, &mut t, &mut n, 300.0, 0.5);
        assert!(matches!(tr[0], Transition::Tripped { .. }));
        let tr = run(&mut m, &mut t, &mut n, 10.0, 4.0);
        assert_eq!(tr, vec![Transition::HalfOpen, Transition::Closed]);
    }

    #[test]
    fn a_slow_ramp_does_not_teach_the_baseline_a_burst() {
        let t0 = Instant::now();
        let (mut t, mut n) = (t0, 0.0);
        let mut m = Monitor::new(Some(cfg()), t0);
        run(&mut m, &mut t, &mut n, 10.0, 3.0);
        // Quadrupling at once stays under the trip factor but is not learned from.
        assert!(run(&mut m, &mut t, &mut n, 40.0, 5.0).is_empty());
        let b = m.baseline(Signal::Connects).unwrap();
        assert!(b < 12.0, "baseline learned an abnormal level: {b}");
        // So the next step up trips.
        assert!(!run(&mut m, &mut t, &mut n, 60.0, 1.0).is_empty());
    }

    #[test]
    fn idle_agents_trip_on_min_rate() {
        let t0 = Instant::now();
        let (mut t, mut n) = (t0, 0.0);
        let mut m = Monitor::new(Some(cfg()), t0);
        run(&mut m, &mut t, &mut n, 0.0, 3.0);
        assert!(
            run(&mut m, &mut t, &mut n, 15.0, 2.0).is_empty(),
            "below min_rate"
        );
        assert!(!run(&mut m, &mut t, &mut n, 100.0, 1.0).is_empty());
    }

    /// A monitor the tick skips while it is quiet ends exactly where one observed every tick
    /// does: same samples, rates, baselines, state and transitions, through bursts, quiet
    /// spells longer and shorter than a window, trips and approvals. Ticks are uneven (as a
    /// busy daemon's are), counts sometimes go back (a reset slot).
    #[test]
    fn skipping_quiet_ticks_changes_nothing() {
        let t0 = Instant::now();
        let every = [
            Some(cfg()),
            None,
            Some(BreakerConfig {
                min_rate: 0.0,
                warmup: Duration::ZERO,
                require_approval: false,
                ..cfg()
            }),
        ];
        for config in every {
            let mut full = Monitor::new(config, t0);
            let mut lazy = Monitor::new(config, t0);
            let (mut t, mut counts) = (t0, [0u64; SIGNALS]);
            let (mut skipped, mut pending) = (0, Vec::new());
            let mut last_seen: Option<[u64; SIGNALS]> = None;
            // A fixed pseudo-random sequence: quiet stretches and bursts.
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for i in 0..6000u32 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                t += Duration::from_millis(95 + x % 11);
                match (i / 300) % 4 {
                    // Quiet.
                    0 | 2 => {}
                    // A burst now and then.
                    1 => counts[(x % SIGNALS as u64) as usize] += x % 40,
                    _ if x.is_multiple_of(97) => counts = [0; SIGNALS],
                    _ => counts[0] += x % 3,
                }
                if i % 1500 == 1499 && full.is_open() {
                    full.approve(t, counts, i % 3000 == 1499);
                    lazy.skipped(pending.drain(..));
                    lazy.approve(t, counts, i % 3000 == 1499);
                    last_seen = None;
                    continue;
                }
                let want = full.observe(t, counts);
                let quiet = lazy.quiet_until().is_some_and(|until| t < until);
                if quiet && last_seen == Some(counts) {
                    assert_eq!(want, None, "a quiet monitor has nothing to say");
                    pending.push(t);
                    skipped += 1;
                    continue;
                }
                lazy.skipped(pending.drain(..));
                let got = lazy.observe(t, counts);
                last_seen = Some(counts);
                assert_eq!(got, want, "tick {i}");
                assert_eq!(format!("{lazy:?}"), format!("{full:?}"), "tick {i}");
            }
            assert!(skipped > 900, "quiet ticks were skipped: {skipped}");
        }
    }
}

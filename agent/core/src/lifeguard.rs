//! Lifeguard's refinements of SWIM failure detection, built around foca.
//!
//! foca implements plain SWIM: a member whose probe fails becomes suspect, and
//! the node whose probe failed declares it down after one fixed timeout. Fast
//! timers then mean false alarms under loss or on a starved node; slow timers
//! mean slow detection. Lifeguard (Dadgar, Phillips and Currey, 2018) fixes
//! this with three mechanisms, all here:
//!
//! - **Local health.** A node that misses its own timers (it was starved of CPU
//!   or stopped) or is itself suspected trusts its own judgement less: a score
//!   from 0 to [`LifeguardConfig::max_health`] stretches its probe period, probe
//!   timeout and suspicion timeouts by `score + 1`. Answered probes bring the
//!   score back down. Unlike memberlist, a failed probe does not count: foca has
//!   no nacks to tell a dead target from a deaf prober, and counting every
//!   failed probe of a dead member would slow down exactly the nodes detecting it.
//! - **Suspicion that shrinks with confirmations.** A suspicion starts at
//!   [`LifeguardConfig::max_suspicion`] and falls toward
//!   [`LifeguardConfig::min_suspicion`] as other nodes report failed probes of
//!   the same member at the same incarnation, log-scaled up to
//!   [`LifeguardConfig::confirmations`]: one lossy link cannot declare a member
//!   down fast, many independent observers can.
//! - **Confirmation checks** (our addition; foca probes members round-robin,
//!   so in a small cluster the other observers would reach a dead member only
//!   seconds later). A node that hears a first-hand report and does not suspect
//!   the member itself checks it at once with one direct, reliable probe; if
//!   that goes unanswered for a probe timeout, its own report confirms the
//!   suspicion. Reports that come from a check start no further checks, so one
//!   suspicion costs at most `fanout` checks.
//! - **Buddy refutation.** The suspected member is told directly (by the node
//!   that suspects it, and on every later probe), so a live member refutes in
//!   one round trip instead of waiting for gossip to reach it.
//!
//! This module is sans-IO and owns only its bookkeeping: the node feeds it
//! foca's suspicion timers, probe outcomes, late timers and the suspicion
//! reports peers send, and it answers with delays, deadlines and which reports
//! are new. It sends nothing and does not choose who hears a report.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::membership::{NodeId, SwimTimer};

/// Lifeguard's knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct LifeguardConfig {
    /// Suspicion timeout once [`confirmations`](Self::confirmations) other nodes
    /// agree, in a cluster of up to 10 members; like the maximum it scales with
    /// `f = max(1, log10 N)`, N the members this node knows now
    /// ([`Lifeguard::set_members`]).
    pub min_suspicion: Duration,
    /// Suspicion timeout with no confirmation (up to 10 members; scales with `f`).
    pub max_suspicion: Duration,
    /// The least suspicion timeout whatever the size and confirmations: in a
    /// small cluster confirmation checks bring every suspicion to the minimum
    /// within a probe timeout, so this is how long a stopped member may stay
    /// silent.
    pub min_suspicion_floor: Duration,
    /// Independent confirmations that bring a suspicion down to the minimum.
    pub confirmations: u32,
    /// Highest local-health score; timers stretch up to `max_health + 1` times.
    pub max_health: u32,
    /// A timer firing this much later than it was due counts against local health.
    pub late_timer: Duration,
}

/// What a suspicion's check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// The timeout has passed: hand foca its down timer now.
    Fire(SwimTimer),
    /// Not yet: check again at this mono ms.
    Later(u64),
    /// Nothing to do (refuted, superseded, or not ours to declare).
    Nothing,
}

#[derive(Debug)]
struct Suspicion {
    incarnation: u16,
    since_ms: u64,
    /// Other nodes that reported a failed probe of the member at this incarnation.
    by: BTreeSet<String>,
    /// foca's down timer, held until the (shrinking) timeout passes. Only the
    /// nodes whose own probe failed hold one.
    down_timer: Option<SwimTimer>,
    /// Our confirmation check of the member at this incarnation, once started:
    /// its nonce while unanswered, `None` once settled.
    check: Option<Option<u64>>,
}

/// Local health and the suspicions this node knows of (see the module docs).
#[derive(Debug)]
pub struct Lifeguard {
    cfg: LifeguardConfig,
    health: u32,
    /// `max(1, log10 N)`: suspicion timeouts grow with the cluster, as it takes
    /// more rounds for a refutation to spread.
    scale: f64,
    suspicions: HashMap<NodeId, Suspicion>,
}

impl Lifeguard {
    /// Healthy, suspecting nobody.
    pub fn new(cfg: LifeguardConfig) -> Self {
        Lifeguard {
            cfg,
            health: 0,
            scale: 1.0,
            suspicions: HashMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LifeguardConfig {
        &self.cfg
    }

    /// The cluster now counts `n` members (this node included): suspicion
    /// timeouts are `max(1, log10 n)` times the configured ones.
    pub fn set_members(&mut self, n: usize) {
        self.scale = (n.max(1) as f64).log10().max(1.0);
    }

    /// The local-health score: 0 is healthy.
    pub fn health(&self) -> u32 {
        self.health
    }

    /// How much longer than configured this node waits, given its health.
    pub fn stretch(&self, d: Duration) -> Duration {
        d * (self.health + 1)
    }

    fn worse(&mut self) {
        self.health = (self.health + 1).min(self.cfg.max_health);
    }

    /// A probe of ours was answered.
    pub fn probe_answered(&mut self) {
        self.health = self.health.saturating_sub(1);
    }

    /// Someone suspected us and we had to refute.
    pub fn refuted(&mut self) {
        self.worse();
    }

    /// A timer fired `late_ms` after it was due; counts if past the threshold.
    pub fn timer_fired_late(&mut self, late_ms: u64) {
        if late_ms > self.cfg.late_timer.as_millis() as u64 {
            self.worse();
        }
    }

    /// The incarnation we suspect `member` at, if we do.
    pub fn suspected_at(&self, member: &NodeId) -> Option<u16> {
        self.suspicions.get(member).map(|s| s.incarnation)
    }

    /// The suspicion of `member` at `incarnation`, started now if new. A report
    /// about an older incarnation than the one held returns `None`.
    fn entry(&mut self, member: &NodeId, incarnation: u16, now_ms: u64) -> Option<&mut Suspicion> {
        let s = self
            .suspicions
            .entry(member.clone())
            .or_insert_with(|| Suspicion {
                incarnation,
                since_ms: now_ms,
                by: BTreeSet::new(),
                down_timer: None,
                check: None,
            });
        if incarnation > s.incarnation {
            *s = Suspicion {
                incarnation,
                since_ms: now_ms,
                by: BTreeSet::new(),
                down_timer: None,
                check: None,
            };
        }
        (s.incarnation == incarnation).then_some(s)
    }

    /// Takes foca's down timer for a member our own probe found failing. Returns
    /// the mono ms at which to check it ([`Lifeguard::due`]); `None` if `timer`
    /// is not a down timer (schedule it as foca asked).
    pub fn hold(&mut self, timer: SwimTimer, now_ms: u64) -> Option<u64> {
        let SwimTimer::ChangeSuspectToDown {
            member_id,
            incarnation,
            ..
        } = &timer
        else {
            return None;
        };
        let (member, incarnation) = (member_id.clone(), *incarnation);
        let s = self.entry(&member, incarnation, now_ms)?;
        s.down_timer = Some(timer);
        Some(self.deadline(&member))
    }

    /// A report from `by` that its probe of `member` at `incarnation` failed.
    /// Returns whether the report is new (forward it), and when to check the
    /// suspicion if we hold its down timer and the report brought it closer.
    pub fn report(
        &mut self,
        member: &NodeId,
        incarnation: u16,
        by: &str,
        now_ms: u64,
    ) -> (bool, Option<u64>) {
        let Some(s) = self.entry(member, incarnation, now_ms) else {
            return (false, None);
        };
        if !s.by.insert(by.to_string()) {
            return (false, None);
        }
        let check = s.down_timer.is_some().then(|| self.deadline(member));
        (true, check)
    }

    /// Starts our confirmation check of `member` at `incarnation` under `nonce`,
    /// unless we suspect it from our own probe or have checked it already at
    /// this incarnation. Returns whether to send the check.
    pub fn start_check(
        &mut self,
        member: &NodeId,
        incarnation: u16,
        nonce: u64,
        now_ms: u64,
    ) -> bool {
        let Some(s) = self.entry(member, incarnation, now_ms) else {
            return false;
        };
        if s.down_timer.is_some() || s.check.is_some() {
            return false;
        }
        s.check = Some(Some(nonce));
        true
    }

    /// An answer to a check arrived: returns whether `nonce` was a check of ours
    /// still waiting (the member is alive; nothing to report).
    pub fn check_answered(&mut self, nonce: u64) -> bool {
        for s in self.suspicions.values_mut() {
            if s.check == Some(Some(nonce)) {
                s.check = Some(None);
                return true;
            }
        }
        false
    }

    /// The check of `member` under `nonce` timed out: returns the incarnation to
    /// report as failing, or `None` if it was answered or the suspicion moved on.
    pub fn check_failed(&mut self, member: &NodeId, nonce: u64) -> Option<u16> {
        let s = self.suspicions.get_mut(member)?;
        if s.check != Some(Some(nonce)) {
            return None;
        }
        s.check = Some(None);
        Some(s.incarnation)
    }

    /// The suspicion of `member` is over (it refuted, went down or was renamed).
    pub fn clear(&mut self, member: &NodeId) {
        self.suspicions.remove(member);
    }

    /// Keeps only suspicions of members in `suspects`, and reports younger than
    /// the longest timeout (they may arrive before foca's own suspect update).
    pub fn retain(&mut self, suspects: &[NodeId], now_ms: u64) {
        let keep = self
            .stretch(self.cfg.max_suspicion.mul_f64(self.scale))
            .as_millis() as u64;
        self.suspicions
            .retain(|id, s| suspects.contains(id) || now_ms.saturating_sub(s.since_ms) < keep);
    }

    /// The suspicion timeout with `confirmations` independent confirmations:
    /// `max - (max - min) * ln(c + 1) / ln(k + 1)`, at least `min`, times
    /// `max(1, log10 N)`, at least the floor, stretched by local health.
    pub fn timeout(&self, confirmations: usize) -> Duration {
        let (min, max) = (
            self.cfg.min_suspicion.as_secs_f64(),
            self.cfg
                .max_suspicion
                .as_secs_f64()
                .max(self.cfg.min_suspicion.as_secs_f64()),
        );
        let k = f64::from(self.cfg.confirmations.max(1));
        let c = (confirmations as f64).min(k);
        let t = max - (max - min) * (c + 1.0).ln() / (k + 1.0).ln();
        let t = (t.max(min) * self.scale).max(self.cfg.min_suspicion_floor.as_secs_f64());
        self.stretch(Duration::from_secs_f64(t))
    }

    fn deadline(&self, member: &NodeId) -> u64 {
        match self.suspicions.get(member) {
            Some(s) => s.since_ms + self.timeout(s.by.len()).as_millis() as u64,
            None => u64::MAX,
        }
    }

    /// Checks the suspicion of `member` at `now_ms`.
    pub fn due(&mut self, member: &NodeId, now_ms: u64) -> Due {
        let at = self.deadline(member);
        let Some(s) = self.suspicions.get_mut(member) else {
            return Due::Nothing;
        };
        if s.down_timer.is_none() {
            return Due::Nothing;
        }
        if now_ms < at {
            return Due::Later(at);
        }
        match s.down_timer.take() {
            Some(t) => Due::Fire(t),
            None => Due::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LifeguardConfig {
        LifeguardConfig {
            min_suspicion: Duration::from_millis(1000),
            max_suspicion: Duration::from_millis(6000),
            confirmations: 3,
            max_health: 8,
            late_timer: Duration::from_millis(200),
            min_suspicion_floor: Duration::ZERO,
        }
    }

    fn member(name: &str) -> NodeId {
        NodeId {
            name: name.into(),
            addr: "127.0.0.1:7000".parse().unwrap(),
            gen: 1,
        }
    }

    fn down_timer(m: &NodeId, incarnation: u16) -> SwimTimer {
        SwimTimer::ChangeSuspectToDown {
            member_id: m.clone(),
            incarnation,
            token: 0,
        }
    }

    #[test]
    fn the_timeout_falls_from_max_to_min_with_confirmations() {
        let lg = Lifeguard::new(cfg());
        let t: Vec<u128> = (0..5).map(|c| lg.timeout(c).as_millis()).collect();
        assert_eq!(t[0], 6000);
        assert!(t[0] > t[1] && t[1] > t[2] && t[2] > t[3], "{t:?}");
        assert_eq!(t[3], 1000);
        assert_eq!(t[4], 1000, "more confirmations than needed change nothing");
    }

    #[test]
    fn a_member_is_checked_once_per_incarnation_and_only_by_non_suspectors() {
        let mut lg = Lifeguard::new(cfg());
        let m = member("m");
        assert!(lg.start_check(&m, 1, 11, 0));
        assert!(!lg.start_check(&m, 1, 12, 10), "one check per incarnation");
        assert!(lg.check_answered(11));
        assert!(!lg.check_answered(11), "an answer settles the check once");
        assert_eq!(lg.check_failed(&m, 11), None, "answered: nothing to report");
        // A refutation (higher incarnation) may be checked again; a timeout reports it.
        assert!(lg.start_check(&m, 2, 13, 20));
        assert_eq!(lg.check_failed(&m, 13), Some(2));
        assert_eq!(lg.check_failed(&m, 13), None, "reported once");
        // A node whose own probe failed does not check: it already suspects.
        let n = member("n");
        assert!(lg.hold(down_timer(&n, 0), 0).is_some());
        assert!(!lg.start_check(&n, 0, 14, 0));
    }

    #[test]
    fn a_lone_suspicion_waits_the_longest_and_confirmations_bring_it_forward() {
        let mut lg = Lifeguard::new(cfg());
        let x = member("x");
        assert_eq!(lg.hold(down_timer(&x, 0), 10_000), Some(16_000));
        assert_eq!(lg.due(&x, 12_000), Due::Later(16_000));
        // The same observer twice is one confirmation.
        let (new, first) = lg.report(&x, 0, "b", 11_000);
        assert!(new);
        assert_eq!(lg.report(&x, 0, "b", 11_100), (false, None));
        let second = lg.report(&x, 0, "c", 11_200).1.unwrap();
        let third = lg.report(&x, 0, "d", 11_300).1.unwrap();
        assert!(first.unwrap() > second && second > third);
        assert_eq!(
            third, 11_000,
            "three confirmations: the minimum from the start"
        );
        assert_eq!(lg.due(&x, 11_300), Due::Fire(down_timer(&x, 0)));
        assert_eq!(lg.due(&x, 11_400), Due::Nothing, "fired once");
    }

    #[test]
    fn reports_about_an_older_incarnation_do_not_count_and_a_newer_one_starts_over() {
        let mut lg = Lifeguard::new(cfg());
        let x = member("x");
        lg.hold(down_timer(&x, 2), 0);
        assert_eq!(lg.report(&x, 1, "b", 100), (false, None));
        assert_eq!(lg.due(&x, 100), Due::Later(6000));
        // The member refuted (incarnation 3) and was suspected again by someone
        // else: our old down timer no longer applies.
        assert!(lg.report(&x, 3, "b", 200).0);
        assert_eq!(lg.due(&x, 10_000), Due::Nothing);
    }

    #[test]
    fn nodes_that_only_heard_of_a_suspicion_never_declare_it() {
        let mut lg = Lifeguard::new(cfg());
        let x = member("x");
        for by in ["b", "c", "d"] {
            assert_eq!(lg.report(&x, 0, by, 0), (true, None));
        }
        assert_eq!(lg.due(&x, 60_000), Due::Nothing);
        // If our own probe then fails, the confirmations already count.
        assert_eq!(lg.hold(down_timer(&x, 0), 500), Some(1000));
    }

    #[test]
    fn poor_local_health_stretches_every_timer_and_probes_restore_it() {
        let mut lg = Lifeguard::new(cfg());
        lg.timer_fired_late(150);
        assert_eq!(lg.health(), 0, "under the threshold");
        lg.timer_fired_late(900);
        lg.timer_fired_late(300);
        lg.refuted();
        assert_eq!(lg.health(), 3);
        assert_eq!(
            lg.stretch(Duration::from_millis(500)),
            Duration::from_millis(2000)
        );
        assert_eq!(lg.timeout(3), Duration::from_millis(4000));
        for _ in 0..20 {
            lg.refuted();
        }
        assert_eq!(lg.health(), 8, "capped");
        for _ in 0..20 {
            lg.probe_answered();
        }
        assert_eq!(lg.health(), 0);
    }

    #[test]
    fn retain_drops_finished_suspicions_but_keeps_fresh_reports() {
        let mut lg = Lifeguard::new(cfg());
        let (x, y) = (member("x"), member("y"));
        lg.report(&x, 0, "b", 0);
        lg.report(&y, 0, "b", 9_000);
        lg.retain(&[], 10_000);
        assert_eq!(lg.suspected_at(&x), None);
        assert_eq!(lg.suspected_at(&y), Some(0));
    }
}

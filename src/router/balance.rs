//! Choosing a host among a model's replicas. Each strategy is a small pure function over the
//! candidates' load, unit-tested here.
//!
//! A candidate's score is what the entry node itself has in flight to it (known at once, so a
//! burst arriving in the same instant spreads out) plus the load it last announced (which covers
//! other entry nodes' traffic, but lags by up to a heartbeat).

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The lowest score; ties broken at random.
    #[default]
    LeastLoaded,
    /// Two candidates at random, the lower score of the two.
    PowerOfTwo,
    /// Each candidate in turn, whatever its load.
    RoundRobin,
    /// This node when it hosts the model, else the least loaded.
    LocalFirst,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// "local" or a peer id.
    pub key: String,
    pub is_local: bool,
    /// Requests this node has in flight to the candidate.
    pub outstanding: u32,
    /// In flight plus queued, as the candidate last reported.
    pub announced_load: u32,
}

impl Candidate {
    fn score(&self) -> u64 {
        u64::from(self.outstanding) + u64::from(self.announced_load)
    }
}

/// Remembers the round-robin position between calls.
#[derive(Debug, Default)]
pub struct Balancer {
    strategy: Strategy,
    next: AtomicUsize,
}

impl Balancer {
    pub fn new(strategy: Strategy) -> Self {
        Self { strategy, next: AtomicUsize::new(0) }
    }

    /// The index of the chosen candidate; `None` only when there are none.
    pub fn choose(&self, candidates: &[Candidate], rng: &mut impl Rng) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        match self.strategy {
            Strategy::LeastLoaded => least_loaded(candidates, rng),
            Strategy::PowerOfTwo => {
                if candidates.len() == 1 {
                    return Some(0);
                }
                let first = rng.random_range(0..candidates.len());
                let mut second = rng.random_range(0..candidates.len() - 1);
                if second >= first {
                    second += 1;
                }
                Some(if candidates[second].score() < candidates[first].score() { second } else { first })
            }
            Strategy::RoundRobin => Some(self.next.fetch_add(1, Ordering::Relaxed) % candidates.len()),
            Strategy::LocalFirst => {
                candidates.iter().position(|c| c.is_local).or_else(|| least_loaded(candidates, rng))
            }
        }
    }
}

fn least_loaded(candidates: &[Candidate], rng: &mut impl Rng) -> Option<usize> {
    let best = candidates.iter().map(Candidate::score).min()?;
    let tied: Vec<usize> = (0..candidates.len()).filter(|&i| candidates[i].score() == best).collect();
    Some(tied[rng.random_range(0..tied.len())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn candidate(key: &str, outstanding: u32, announced_load: u32) -> Candidate {
        Candidate { key: key.into(), is_local: key == "local", outstanding, announced_load }
    }

    fn counts(balancer: &Balancer, candidates: &mut [Candidate], picks: usize) -> Vec<u32> {
        // Simulate a burst: each pick adds to the chosen candidate's outstanding count at once.
        let mut rng = StdRng::seed_from_u64(1);
        let mut chosen = vec![0; candidates.len()];
        for _ in 0..picks {
            let index = balancer.choose(candidates, &mut rng).unwrap();
            candidates[index].outstanding += 1;
            chosen[index] += 1;
        }
        chosen
    }

    #[test]
    fn no_candidates_no_choice() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(Balancer::new(Strategy::LeastLoaded).choose(&[], &mut rng), None);
    }

    #[test]
    fn least_loaded_spreads_a_burst_evenly() {
        let mut candidates = [candidate("a", 0, 0), candidate("b", 0, 0)];
        assert_eq!(counts(&Balancer::new(Strategy::LeastLoaded), &mut candidates, 40), [20, 20]);
    }

    #[test]
    fn least_loaded_avoids_an_announced_busy_host() {
        let mut candidates = [candidate("a", 0, 10), candidate("b", 0, 0)];
        assert_eq!(counts(&Balancer::new(Strategy::LeastLoaded), &mut candidates, 10), [0, 10]);
    }

    #[test]
    fn power_of_two_spreads_a_burst() {
        let mut candidates = [candidate("a", 0, 0), candidate("b", 0, 0), candidate("c", 0, 0)];
        let chosen = counts(&Balancer::new(Strategy::PowerOfTwo), &mut candidates, 300);
        assert!(chosen.iter().all(|&n| (80..=120).contains(&n)), "{chosen:?}");
    }

    #[test]
    fn round_robin_takes_turns_whatever_the_load() {
        let mut candidates = [candidate("a", 0, 50), candidate("b", 0, 0), candidate("c", 0, 0)];
        assert_eq!(counts(&Balancer::new(Strategy::RoundRobin), &mut candidates, 9), [3, 3, 3]);
    }

    #[test]
    fn local_first_prefers_this_node() {
        let mut candidates = [candidate("a", 0, 0), candidate("local", 0, 0)];
        assert_eq!(counts(&Balancer::new(Strategy::LocalFirst), &mut candidates, 5), [0, 5]);
        let mut remote_only = [candidate("a", 3, 0), candidate("b", 0, 0)];
        assert_eq!(counts(&Balancer::new(Strategy::LocalFirst), &mut remote_only, 3), [0, 3]);
    }

    #[test]
    fn strategies_parse_from_config_names() {
        for (name, strategy) in [
            ("\"least-loaded\"", Strategy::LeastLoaded),
            ("\"power-of-two\"", Strategy::PowerOfTwo),
            ("\"round-robin\"", Strategy::RoundRobin),
            ("\"local-first\"", Strategy::LocalFirst),
        ] {
            assert_eq!(serde_json::from_str::<Strategy>(name).unwrap(), strategy);
        }
    }
}

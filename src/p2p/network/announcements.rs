//! How often this node greets new subscribers with its announcement, and which announcements of
//! others are recent enough to take.
//!
//! A peer that subscribes to the announcement topic is sent this node's announcement at once, so
//! it need not wait for the next heartbeat. A SUBSCRIBE costs its sender about 60 bytes and an
//! announcement is up to 64 KiB, so greetings go to members only, each peer at most once per
//! `GREETING_PER_PEER`, and all of them together in at most one announcement per
//! `GREETING_INTERVAL`.
//!
//! Gossipsub forgets the messages it has seen after a minute; a signed announcement recorded
//! earlier would then verify again and bring back a node that left. So an announcement is taken
//! only when it is newer than the last one taken from its author, and issued within
//! `MAX_CLOCK_SKEW` of this node's clock, which bounds how long the last one must be remembered.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// Greetings go out at most this often in all: one announcement greets every new subscriber.
pub(super) const GREETING_INTERVAL: Duration = Duration::from_secs(1);
/// The same peer is greeted at most this often, however often it subscribes.
const GREETING_PER_PEER: Duration = Duration::from_secs(30);
/// Peers whose last greeting is remembered; past this, old ones are forgotten first.
const MAX_GREETED: usize = 1024;
/// How far an announcement's `issued_at_ms` may be from this node's clock, either way. Clocks kept
/// by NTP agree within a second; five minutes is the skew Kerberos tolerates by default, room for
/// a machine whose clock is badly set, while a recorded announcement is useless five minutes on.
pub(super) const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);
/// Authors whose latest announcement is remembered before those out of the window are forgotten.
const MAX_AUTHORS: usize = 1024;

#[derive(Default)]
pub(super) struct Greetings {
    greeted: HashMap<PeerId, Instant>,
    /// A subscriber waits for the next greeting.
    pending: bool,
    last_sent: Option<Instant>,
}

impl Greetings {
    /// `peer`, a member, subscribed: returns whether to publish the announcement now. A greeting
    /// held back goes out when `due` says so.
    pub(super) fn subscribed(&mut self, peer: PeerId, now: Instant) -> bool {
        if self.greeted.get(&peer).is_some_and(|at| now.duration_since(*at) < GREETING_PER_PEER) {
            return false;
        }
        if self.greeted.len() >= MAX_GREETED {
            self.greeted.retain(|_, at| now.duration_since(*at) < GREETING_PER_PEER);
            if self.greeted.len() >= MAX_GREETED {
                return false;
            }
        }
        self.greeted.insert(peer, now);
        self.pending = true;
        self.due(now)
    }

    /// Whether a greeting is waiting and may go out now; if so, it counts as sent.
    pub(super) fn due(&mut self, now: Instant) -> bool {
        if !self.pending || self.last_sent.is_some_and(|at| now.duration_since(at) < GREETING_INTERVAL) {
            return false;
        }
        self.pending = false;
        self.last_sent = Some(now);
        true
    }

    pub(super) fn forget(&mut self, peer: &PeerId) {
        self.greeted.remove(peer);
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Stale {
    /// Issued too long ago, or too far ahead, by this node's clock.
    OutOfWindow,
    /// Not newer than the last announcement taken from its author: a replay, or overtaken.
    NotNewer,
}

/// The latest `issued_at_ms` taken from each author.
#[derive(Default)]
pub(super) struct Freshness {
    latest: HashMap<PeerId, u64>,
}

impl Freshness {
    pub(super) fn check(&self, author: &PeerId, issued_at_ms: u64, now_ms: u64) -> Result<(), Stale> {
        let skew = MAX_CLOCK_SKEW.as_millis() as u64;
        if issued_at_ms.saturating_add(skew) < now_ms || issued_at_ms > now_ms.saturating_add(skew) {
            return Err(Stale::OutOfWindow);
        }
        if self.latest.get(author).is_some_and(|latest| issued_at_ms <= *latest) {
            return Err(Stale::NotNewer);
        }
        Ok(())
    }

    /// Remember the announcement taken from `author`. What is out of the window is forgotten when
    /// room is needed: anything not newer than it is out of the window too.
    pub(super) fn taken(&mut self, author: PeerId, issued_at_ms: u64, now_ms: u64) {
        if self.latest.len() >= MAX_AUTHORS && !self.latest.contains_key(&author) {
            let skew = MAX_CLOCK_SKEW.as_millis() as u64;
            self.latest.retain(|_, latest| latest.saturating_add(skew) >= now_ms);
            if self.latest.len() >= MAX_AUTHORS
                && let Some(oldest) = self.latest.iter().min_by_key(|(_, at)| **at).map(|(peer, _)| *peer)
            {
                self.latest.remove(&oldest);
            }
        }
        let latest = self.latest.entry(author).or_default();
        *latest = (*latest).max(issued_at_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_floods_cost_one_greeting_per_interval_and_one_per_peer() {
        let start = Instant::now();
        let mut greetings = Greetings::default();
        let flooder = PeerId::random();
        assert!(greetings.subscribed(flooder, start), "the first subscriber is greeted at once");
        let sent =
            (1..1000).filter(|n| greetings.subscribed(flooder, start + Duration::from_millis(*n))).count();
        assert_eq!(sent, 0, "the same peer again and again");
        // Many peers at once share one greeting a second.
        let others: Vec<PeerId> = (0..50).map(|_| PeerId::random()).collect();
        let sent = others.iter().filter(|peer| greetings.subscribed(**peer, start)).count();
        assert_eq!(sent, 0);
        assert!(!greetings.due(start + GREETING_INTERVAL / 2));
        assert!(greetings.due(start + GREETING_INTERVAL));
        assert!(!greetings.due(start + GREETING_INTERVAL * 2), "nothing waits any more");
        // Long after, the flooder is greeted again.
        assert!(greetings.subscribed(flooder, start + GREETING_PER_PEER * 2));
    }

    #[test]
    fn announcements_are_taken_once_each_and_only_near_now() {
        let now_ms = 1_700_000_000_000;
        let skew = MAX_CLOCK_SKEW.as_millis() as u64;
        let author = PeerId::random();
        let mut freshness = Freshness::default();
        assert_eq!(freshness.check(&author, now_ms - skew - 1, now_ms), Err(Stale::OutOfWindow));
        assert_eq!(freshness.check(&author, now_ms + skew + 1, now_ms), Err(Stale::OutOfWindow));
        assert_eq!(freshness.check(&author, now_ms - skew + 1000, now_ms), Ok(()), "a slow clock");
        freshness.taken(author, now_ms, now_ms);
        assert_eq!(freshness.check(&author, now_ms, now_ms + 70_000), Err(Stale::NotNewer), "a replay");
        assert_eq!(freshness.check(&author, now_ms - 1, now_ms), Err(Stale::NotNewer));
        assert_eq!(freshness.check(&author, now_ms + 2000, now_ms + 2000), Ok(()));
        assert_eq!(freshness.check(&PeerId::random(), now_ms, now_ms), Ok(()), "per author");
    }

    #[test]
    fn remembered_authors_are_bounded() {
        let now_ms = 1_700_000_000_000;
        let mut freshness = Freshness::default();
        for _ in 0..MAX_AUTHORS * 2 {
            freshness.taken(PeerId::random(), now_ms, now_ms);
        }
        assert_eq!(freshness.latest.len(), MAX_AUTHORS);
    }
}

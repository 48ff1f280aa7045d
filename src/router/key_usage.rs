//! What each API key used through this node: per second over the last minute (for its limits)
//! and since the node started, by model (for `/api/keys` and `/metrics`).
//!
//! Limits are counted across the cluster: every node announces each key's use in the last minute
//! (`KeyUsageReport`), and a request is admitted when this node's own count plus the latest report
//! of every other online node leaves room. How exact that is: another node's share is as old as
//! its last announcement (republished within 250 ms of a change, at least every 2 s) plus gossip's
//! delay. A key sent to several nodes at once can get past its limit by what the others admit in
//! that time, never by a multiple of the limit. Tokens are counted when an answer ends, so the
//! request that crosses the token limit finishes; the next one is refused.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

use crate::p2p::{KeyGrant, KeyUsageReport, MAX_KEY_REPORTS};

/// The window limits are counted over.
pub const WINDOW_SECS: u64 = 60;

/// Requests and tokens of one key in the last minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MinuteUse {
    pub requests: u64,
    pub tokens: u64,
}

/// One key's use of one model since the node started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ModelUsage {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    second: u64,
    requests: u32,
    tokens: u64,
}

#[derive(Debug, Default)]
struct KeyCounts {
    /// Oldest first; none older than `WINDOW_SECS`.
    buckets: VecDeque<Bucket>,
    by_model: BTreeMap<String, ModelUsage>,
    last_second: u64,
}

impl KeyCounts {
    fn expire(&mut self, now: u64) {
        while self.buckets.front().is_some_and(|bucket| bucket.second + WINDOW_SECS <= now) {
            self.buckets.pop_front();
        }
    }

    fn minute(&self) -> MinuteUse {
        self.buckets.iter().fold(MinuteUse::default(), |sum, bucket| MinuteUse {
            requests: sum.requests + u64::from(bucket.requests),
            tokens: sum.tokens + bucket.tokens,
        })
    }

    fn bucket(&mut self, now: u64) -> &mut Bucket {
        self.last_second = now;
        if self.buckets.back().is_none_or(|bucket| bucket.second != now) {
            self.buckets.push_back(Bucket { second: now, requests: 0, tokens: 0 });
        }
        self.buckets.back_mut().expect("a bucket was just pushed")
    }

    /// Seconds until this node's oldest counted use leaves the window (at least 1).
    fn seconds_until_room(&self, now: u64) -> u64 {
        self.buckets
            .front()
            .map_or(WINDOW_SECS, |bucket| (bucket.second + WINDOW_SECS).saturating_sub(now))
            .max(1)
    }
}

/// Why a request of a key is refused, with how long to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    pub limit: &'static str,
    pub retry_after_secs: u64,
}

/// Per-key counters of this node. `now` is a second count from any fixed origin (the router uses
/// seconds since it started).
#[derive(Debug, Default)]
pub struct KeyMeter {
    keys: Mutex<HashMap<String, KeyCounts>>,
}

impl KeyMeter {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, KeyCounts>> {
        self.keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admit one request of `grant` for `model` when it leaves the key within its limits, counting
    /// `others` (what the other nodes announced for it) besides this node's own use; the request
    /// counts from now on.
    pub fn admit(&self, grant: &KeyGrant, model: &str, others: MinuteUse, now: u64) -> Result<(), OverLimit> {
        let mut keys = self.lock();
        let counts = keys.entry(grant.name.clone()).or_default();
        counts.expire(now);
        let own = counts.minute();
        let over = |limit: Option<u32>, used: u64, adding: u64| {
            limit.is_some_and(|limit| used + adding > u64::from(limit))
        };
        let refused = if over(grant.requests_per_minute, own.requests + others.requests, 1) {
            Some("requests per minute")
        } else if over(grant.tokens_per_minute, own.tokens + others.tokens, 0)
            || grant.tokens_per_minute == Some(0)
        {
            Some("tokens per minute")
        } else {
            None
        };
        if let Some(limit) = refused {
            // Another node's share leaves the window on its own clock; a client that waits for
            // this node's oldest use to leave may find room, or wait once more.
            return Err(OverLimit { limit, retry_after_secs: counts.seconds_until_room(now) });
        }
        counts.bucket(now).requests += 1;
        counts.by_model.entry(model.to_string()).or_default().requests += 1;
        Ok(())
    }

    /// Count the tokens of an answer that ended.
    pub fn record_tokens(
        &self,
        key: &str,
        model: &str,
        prompt_tokens: u64,
        completion_tokens: u64,
        now: u64,
    ) {
        let mut keys = self.lock();
        let counts = keys.entry(key.to_string()).or_default();
        counts.expire(now);
        counts.bucket(now).tokens += prompt_tokens + completion_tokens;
        let usage = counts.by_model.entry(model.to_string()).or_default();
        usage.prompt_tokens += prompt_tokens;
        usage.completion_tokens += completion_tokens;
    }

    /// What this node announces: every key used here, the most recently used first, at most
    /// `MAX_KEY_REPORTS`.
    pub fn reports(&self, now: u64) -> Vec<KeyUsageReport> {
        let mut keys = self.lock();
        let mut reports: Vec<(u64, KeyUsageReport)> = keys
            .iter_mut()
            .map(|(name, counts)| {
                counts.expire(now);
                let minute = counts.minute();
                let total = total(&counts.by_model);
                let report = KeyUsageReport {
                    key: name.clone(),
                    minute_requests: u32::try_from(minute.requests).unwrap_or(u32::MAX),
                    minute_tokens: minute.tokens,
                    requests: total.requests,
                    prompt_tokens: total.prompt_tokens,
                    completion_tokens: total.completion_tokens,
                };
                (counts.last_second, report)
            })
            .collect();
        reports.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.key.cmp(&b.1.key)));
        reports.into_iter().take(MAX_KEY_REPORTS).map(|(_, report)| report).collect()
    }

    /// Each key's use of each model through this node since it started.
    pub fn by_model(&self) -> BTreeMap<String, BTreeMap<String, ModelUsage>> {
        self.lock().iter().map(|(name, counts)| (name.clone(), counts.by_model.clone())).collect()
    }
}

/// The sum over models.
pub fn total(by_model: &BTreeMap<String, ModelUsage>) -> ModelUsage {
    by_model.values().fold(ModelUsage::default(), |sum, usage| ModelUsage {
        requests: sum.requests + usage.requests,
        prompt_tokens: sum.prompt_tokens + usage.prompt_tokens,
        completion_tokens: sum.completion_tokens + usage.completion_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(requests: Option<u32>, tokens: Option<u32>) -> KeyGrant {
        KeyGrant {
            name: "intern".into(),
            models: Vec::new(),
            requests_per_minute: requests,
            tokens_per_minute: tokens,
        }
    }

    #[test]
    fn requests_are_limited_per_minute_with_the_wait_until_the_oldest_leaves() {
        let meter = KeyMeter::default();
        let key = grant(Some(3), None);
        for second in [100, 110, 120] {
            assert_eq!(meter.admit(&key, "m", MinuteUse::default(), second), Ok(()));
        }
        let refused = meter.admit(&key, "m", MinuteUse::default(), 130).unwrap_err();
        assert_eq!(refused, OverLimit { limit: "requests per minute", retry_after_secs: 30 });
        // The first request leaves the window at 160.
        assert!(meter.admit(&key, "m", MinuteUse::default(), 159).is_err());
        assert_eq!(meter.admit(&key, "m", MinuteUse::default(), 160), Ok(()));
        assert_eq!(meter.by_model()["intern"]["m"].requests, 4, "refused requests are not counted");
    }

    #[test]
    fn other_nodes_use_counts_against_the_same_limit() {
        let meter = KeyMeter::default();
        let key = grant(Some(5), None);
        let others = MinuteUse { requests: 4, tokens: 0 };
        assert_eq!(meter.admit(&key, "m", others, 0), Ok(()));
        let refused = meter.admit(&key, "m", others, 1).unwrap_err();
        assert_eq!(refused.limit, "requests per minute");
        let busy_elsewhere = MinuteUse { requests: 5, tokens: 0 };
        assert!(meter.admit(&grant(Some(5), None), "m", busy_elsewhere, 2).is_err());
    }

    #[test]
    fn tokens_are_counted_when_answers_end_and_refuse_the_next_request() {
        let meter = KeyMeter::default();
        let key = grant(None, Some(100));
        assert_eq!(meter.admit(&key, "m", MinuteUse::default(), 0), Ok(()));
        meter.record_tokens("intern", "m", 30, 80, 1);
        let refused = meter.admit(&key, "m", MinuteUse::default(), 2).unwrap_err();
        assert_eq!(refused.limit, "tokens per minute");
        assert_eq!(meter.admit(&key, "m", MinuteUse { requests: 0, tokens: 0 }, 61), Ok(()));
        assert!(meter.admit(&grant(None, Some(0)), "m", MinuteUse::default(), 61).is_err());
        let usage = meter.by_model()["intern"]["m"];
        assert_eq!(usage, ModelUsage { requests: 2, prompt_tokens: 30, completion_tokens: 80 });
    }

    #[test]
    fn reports_carry_the_minute_and_the_totals_most_recent_first() {
        let meter = KeyMeter::default();
        let unlimited = KeyGrant { name: "app".into(), ..grant(None, None) };
        meter.admit(&grant(None, None), "a", MinuteUse::default(), 10).unwrap();
        meter.record_tokens("intern", "a", 5, 7, 10);
        meter.admit(&unlimited, "b", MinuteUse::default(), 20).unwrap();
        let reports = meter.reports(30);
        assert_eq!(reports.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), ["app", "intern"]);
        assert_eq!(
            (reports[1].minute_requests, reports[1].minute_tokens, reports[1].completion_tokens),
            (1, 12, 7)
        );
        let later = meter.reports(75);
        assert_eq!((later[1].minute_requests, later[1].requests), (0, 1), "the minute empties; totals stay");
    }
}

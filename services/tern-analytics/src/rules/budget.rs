//! Per-tenant CPU budgets for rules: each tenant's rules may spend at most
//! `rules.max_tenant_cpu_ms_per_sec` of evaluation time per second on a stream (a token
//! bucket that holds one second's worth). A tenant over its budget has its messages skipped
//! by its rules, counted and logged, until the bucket refills, so one tenant's expensive rules
//! cannot hold up every other tenant's on the same consumer.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tern_core::TenantId;

/// How often a throttled tenant is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

struct Bucket {
    /// Evaluation time left, in microseconds; negative after an expensive message.
    left_us: i64,
    refilled: Instant,
    logged: Option<Instant>,
}

pub(crate) struct Budgets {
    per_second_us: i64,
    buckets: HashMap<TenantId, Bucket>,
}

/// What [`Budgets::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    Admit,
    /// Over budget; `log` once in a while.
    Skip {
        log: bool,
    },
}

impl Budgets {
    pub(crate) fn new(cpu_ms_per_sec: u64) -> Self {
        Self {
            per_second_us: i64::try_from(cpu_ms_per_sec.saturating_mul(1000)).unwrap_or(i64::MAX),
            buckets: HashMap::new(),
        }
    }

    /// Whether the tenant's rules may look at one more message `now`.
    pub(crate) fn admit(&mut self, tenant: TenantId, now: Instant) -> Admission {
        let per_second = self.per_second_us;
        let bucket = self.buckets.entry(tenant).or_insert(Bucket {
            left_us: per_second,
            refilled: now,
            logged: None,
        });
        let elapsed = now.saturating_duration_since(bucket.refilled);
        let refill = (elapsed.as_micros() as i64).saturating_mul(per_second) / 1_000_000;
        if refill > 0 {
            bucket.left_us = bucket.left_us.saturating_add(refill).min(per_second);
            bucket.refilled = now;
        }
        if bucket.left_us > 0 {
            return Admission::Admit;
        }
        let log = bucket
            .logged
            .is_none_or(|at| now.saturating_duration_since(at) >= LOG_EVERY);
        if log {
            bucket.logged = Some(now);
        }
        Admission::Skip { log }
    }

    /// Charges the tenant for evaluation time it spent.
    pub(crate) fn charge(&mut self, tenant: TenantId, spent: Duration) {
        if let Some(bucket) = self.buckets.get_mut(&tenant) {
            let spent = i64::try_from(spent.as_micros()).unwrap_or(i64::MAX);
            bucket.left_us = bucket.left_us.saturating_sub(spent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_over_its_budget_waits_for_the_refill_and_others_do_not() {
        let (heavy, light) = (TenantId::random(), TenantId::random());
        let mut budgets = Budgets::new(10); // 10 ms per second
        let t0 = Instant::now();
        assert_eq!(budgets.admit(heavy, t0), Admission::Admit);
        budgets.charge(heavy, Duration::from_millis(25));
        assert_eq!(
            budgets.admit(heavy, t0),
            Admission::Skip { log: true },
            "15 ms in debt"
        );
        assert_eq!(
            budgets.admit(heavy, t0 + Duration::from_millis(500)),
            Admission::Skip { log: false },
            "10 ms in debt, logged a moment ago"
        );
        assert_eq!(budgets.admit(light, t0), Admission::Admit, "its own bucket");
        // 1.6 s later the debt is repaid (16 ms refilled).
        assert_eq!(
            budgets.admit(heavy, t0 + Duration::from_millis(1_600)),
            Admission::Admit
        );
        // A long idle time refills one second's worth, no more.
        budgets.charge(heavy, Duration::from_millis(1));
        let later = t0 + Duration::from_secs(3_600);
        assert_eq!(budgets.admit(heavy, later), Admission::Admit);
        budgets.charge(heavy, Duration::from_millis(11));
        assert!(matches!(
            budgets.admit(heavy, later),
            Admission::Skip { .. }
        ));
    }
}

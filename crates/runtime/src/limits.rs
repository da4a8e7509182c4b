//! Per-API rate limits, shared by every step of a worker process (DESIGN.md section 5.5): a
//! worker waits for a token before each call of a throttled API, so a burst of work (a window
//! opening on hundreds of groups) slows the worker down instead of making AWS throttle it and
//! every other caller in the account. The SDK's own retry still handles what throttling remains.
//!
//! Sizes follow AWS's published request-token buckets where AWS publishes them:
//! - EC2 mutating actions: bucket 100, refill 5 per second (the EC2 API reference, "Request
//!   throttling", publishes per-action buckets of that order).
//! - SSM `PutParameter`: 3 transactions per second (the standard-throughput quota).
//! - Auto Scaling: one bucket shared by every action of the account; AWS does not publish its
//!   size, so 20 with a refill of 10 per second is a conservative choice to check against the
//!   fault proxy's throttling (`tests/src/proxy.rs`).
//!
//! A worker's bucket is slightly smaller and slower than AWS's (90% of the size, 95% of the
//! refill): AWS's bucket and ours are not started at the same instant, and calls reach AWS a
//! little after they leave, so a limiter at exactly AWS's rate would still be throttled now and
//! then. The margin keeps a busy worker at 95% of the allowed rate with (almost) no throttling;
//! `just bench-throttle` measures both against the fault proxy's model of AWS's buckets.
//!
//! `PutEvents` needs no bucket here: the publisher already sends at most 10 entries per call and
//! the account quota is thousands of entries per second.

use std::num::NonZeroU32;
use std::sync::LazyLock;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// An API family with its own bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// EC2 actions that change something (`CreateLaunchTemplateVersion`, `ModifyImageAttribute`, ...).
    Ec2Mutating,
    /// SSM `PutParameter`.
    SsmPutParameter,
    /// Every Auto Scaling action (one shared bucket).
    AutoScaling,
}

impl Api {
    /// AWS's (bucket size, tokens per second) for this family.
    pub const fn size(self) -> (u32, u32) {
        match self {
            Api::Ec2Mutating => (100, 5),
            Api::SsmPutParameter => (3, 3),
            Api::AutoScaling => (20, 10),
        }
    }

    /// This process's bucket: 90% of AWS's size (at least 1), refilled at 95% of AWS's rate.
    pub fn quota(self) -> Quota {
        let (burst, per_second) = self.size();
        let burst = NonZeroU32::new(burst * 9 / 10).unwrap_or(NonZeroU32::MIN);
        let period = Duration::from_secs_f64(1.0 / (f64::from(per_second.max(1)) * 0.95));
        Quota::with_period(period)
            .expect("a positive refill period")
            .allow_burst(burst)
    }
}

struct Limits {
    ec2_mutating: DefaultDirectRateLimiter,
    ssm_put_parameter: DefaultDirectRateLimiter,
    autoscaling: DefaultDirectRateLimiter,
}

static LIMITS: LazyLock<Limits> = LazyLock::new(|| Limits {
    ec2_mutating: RateLimiter::direct(Api::Ec2Mutating.quota()),
    ssm_put_parameter: RateLimiter::direct(Api::SsmPutParameter.quota()),
    autoscaling: RateLimiter::direct(Api::AutoScaling.quota()),
});

tokio::task_local! {
    /// The tokens taken within [`count_tokens`].
    static TAKEN: std::cell::Cell<u32>;
}

/// Run `work` and count the tokens it took, of every API (what a test checks a call pattern by).
pub async fn count_tokens<F: Future>(work: F) -> (F::Output, u32) {
    TAKEN
        .scope(std::cell::Cell::new(0), async {
            let out = work.await;
            (out, TAKEN.with(std::cell::Cell::get))
        })
        .await
}

/// Wait until this process may make one more call of `api`.
pub async fn acquire(api: Api) {
    let _ = TAKEN.try_with(|n| n.set(n.get() + 1));
    let limiter = match api {
        Api::Ec2Mutating => &LIMITS.ec2_mutating,
        Api::SsmPutParameter => &LIMITS.ssm_put_parameter,
        Api::AutoScaling => &LIMITS.autoscaling,
    };
    limiter.until_ready().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;

    /// How many calls a full bucket allows at once, and how many more after `later`.
    fn allowed(api: Api, later: Duration) -> (usize, usize) {
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::direct_with_clock(api.quota(), clock.clone());
        let burst = std::iter::from_fn(|| limiter.check().ok())
            .take(10_000)
            .count();
        clock.advance(later);
        let refilled = std::iter::from_fn(|| limiter.check().ok())
            .take(10_000)
            .count();
        (burst, refilled)
    }

    #[test]
    fn buckets_are_a_little_under_aws_sizes_and_refill_rates() {
        // 90% of AWS's bucket at once; 95% of its refill: 9.5 tokens in 2 s at 5/s.
        assert_eq!(allowed(Api::Ec2Mutating, Duration::from_secs(2)), (90, 9));
        assert_eq!(
            allowed(Api::Ec2Mutating, Duration::from_secs(10)).1,
            47,
            "47.5 tokens in 10 s"
        );
        assert_eq!(
            allowed(Api::SsmPutParameter, Duration::from_millis(700)),
            (2, 1),
            "3/s at 95% is one token every 351 ms"
        );
        assert_eq!(
            allowed(Api::AutoScaling, Duration::from_secs(10)),
            (18, 18),
            "the bucket holds 18 however long it refills"
        );
        assert_eq!(allowed(Api::AutoScaling, Duration::from_secs(1)), (18, 9));
    }
}

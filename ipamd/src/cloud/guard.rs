//! Every EC2 call ipamd makes goes through here: a per-node token bucket (so a burst of pod
//! churn cannot trip the account-wide API limit for the whole cluster), retries of throttling and
//! server errors with jittered exponential backoff, and the counters behind the metrics.

use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;
use tracing::{debug, error, warn};

use super::{CloudError, Ec2, EniFilter, EniInfo, ErrorKind, NewEni, SubnetFilter, SubnetInfo};
use crate::instance::types::InstanceLimits;
use crate::pool::datastore::Prefix;

/// Token bucket: `burst` calls at once, then `per_second`. Adaptive: EC2 throttling a call
/// means the account's budget is spent, so the node empties its bucket and halves its rate
/// (down to one call every 20 s); each call that goes through gives back a tenth of the
/// configured rate. Additive increase, multiplicative decrease: a fleet throttled together
/// slows together instead of retrying in lockstep.
#[derive(Debug)]
pub struct Bucket {
    burst: f64,
    configured: f64,
    per_second: f64,
    tokens: f64,
    at: Instant,
}

/// The slowest an adaptive bucket goes: one call every 20 s.
const MIN_RATE: f64 = 1.0 / 20.0;

impl Bucket {
    pub fn new(burst: u32, per_second: f64) -> Bucket {
        Bucket {
            burst: burst as f64,
            configured: per_second,
            per_second,
            tokens: burst as f64,
            at: Instant::now(),
        }
    }

    /// EC2 said RequestLimitExceeded.
    pub fn throttled(&mut self) {
        self.tokens = 0.0;
        self.per_second = (self.per_second / 2.0).max(MIN_RATE.min(self.configured));
    }

    /// A call went through.
    pub fn succeeded(&mut self) {
        self.per_second = (self.per_second + self.configured / 10.0).min(self.configured);
    }

    pub fn rate(&self) -> f64 {
        self.per_second
    }

    /// Take a token if there is one; otherwise how long until there will be.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }
}

/// Backoff before retry `attempt` (1-based): exponential from `base`, capped, with jitter in
/// [d/2, d] so nodes throttled together do not retry together.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let d = exp.min(cap);
    d.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// Tries of one call EC2 throttles, the first included.
const THROTTLED_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            base: Duration::from_millis(200),
            cap: Duration::from_secs(8),
        }
    }
}

pub struct Guarded<E> {
    inner: E,
    bucket: Mutex<Bucket>,
    policy: RetryPolicy,
    /// One DescribeNetworkInterfaces in flight per node: callers that queue behind one take
    /// its answer when it started after they asked (same filter), instead of asking again.
    describe_gate: tokio::sync::Mutex<()>,
    last_describe: Mutex<Option<Described>>,
}

type Described = (String, Instant, Result<Vec<EniInfo>, CloudError>);

impl<E: Ec2> Guarded<E> {
    pub fn new(inner: E, bucket: Bucket, policy: RetryPolicy) -> Guarded<E> {
        Guarded {
            inner,
            bucket: Mutex::new(bucket),
            policy,
            describe_gate: tokio::sync::Mutex::new(()),
            last_describe: Mutex::new(None),
        }
    }

    async fn wait_token(&self) {
        loop {
            let r = match self.bucket.lock() {
                Ok(mut b) => b.take(Instant::now()),
                Err(_) => Ok(()),
            };
            match r {
                Ok(()) => return,
                Err(d) => tokio::time::sleep(d).await,
            }
        }
    }

    fn record(&self, op: &'static str, took: Duration, err: Option<&CloudError>) {
        crate::metrics::global().ec2_call(
            op,
            took.as_secs_f64() * 1000.0,
            err.map(|e| (e.label(), e.kind == ErrorKind::Throttled)),
        );
    }

    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, CloudError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, CloudError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.wait_token().await;
            let t0 = Instant::now();
            let r = f().await;
            self.record(op, t0.elapsed(), r.as_ref().err());
            if let Ok(mut b) = self.bucket.lock() {
                match &r {
                    Err(e) if e.kind == ErrorKind::Throttled => b.throttled(),
                    Ok(_) => b.succeeded(),
                    Err(_) => {}
                }
            }
            match r {
                Ok(v) => {
                    debug!(op, ms = t0.elapsed().as_millis() as u64, "EC2 call");
                    return Ok(v);
                }
                // Throttling is the account's budget, not this call's luck: a few tries, then
                // the caller backs off as a whole (the pool manager pauses growth).
                Err(e)
                    if e.retryable()
                        && attempt
                            < if e.kind == ErrorKind::Throttled {
                                THROTTLED_ATTEMPTS.min(self.policy.attempts)
                            } else {
                                self.policy.attempts
                            } =>
                {
                    let d = backoff(
                        attempt,
                        self.policy.base,
                        self.policy.cap,
                        rand::rng().random::<f64>(),
                    );
                    warn!(op, code = %e.code, error = %e, attempt, retry_in_ms = d.as_millis() as u64, "EC2 call failed; retrying");
                    tokio::time::sleep(d).await;
                }
                Err(e) => {
                    if e.kind == ErrorKind::Unauthorized {
                        error!(
                            op,
                            "the node's IAM role lacks permission ec2:{op} ({}); grant it (AmazonEKS_CNI_Policy has it)",
                            e.message
                        );
                    }
                    return Err(e);
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl<E: Ec2> Ec2 for Guarded<E> {
    async fn describe_enis(&self, f: EniFilter) -> Result<Vec<EniInfo>, CloudError> {
        let key = format!("{f:?}");
        let asked = Instant::now();
        let _one = self.describe_gate.lock().await;
        if let Ok(last) = self.last_describe.lock() {
            if let Some((k, started, res)) = last.as_ref() {
                if *k == key && *started >= asked {
                    return res.clone();
                }
            }
        }
        let started = Instant::now();
        let res = self
            .call("DescribeNetworkInterfaces", || {
                self.inner.describe_enis(f.clone())
            })
            .await;
        if let Ok(mut last) = self.last_describe.lock() {
            *last = Some((key, started, res.clone()));
        }
        res
    }
    async fn create_eni(&self, r: NewEni) -> Result<EniInfo, CloudError> {
        self.call("CreateNetworkInterface", || {
            self.inner.create_eni(r.clone())
        })
        .await
    }
    async fn attach_eni(&self, eni: &str, inst: &str, dev: u32) -> Result<String, CloudError> {
        self.call("AttachNetworkInterface", || {
            self.inner.attach_eni(eni, inst, dev)
        })
        .await
    }
    async fn set_delete_on_termination(&self, eni: &str, att: &str) -> Result<(), CloudError> {
        self.call("ModifyNetworkInterfaceAttribute", || {
            self.inner.set_delete_on_termination(eni, att)
        })
        .await
    }
    async fn detach_eni(&self, att: &str) -> Result<(), CloudError> {
        self.call("DetachNetworkInterface", || self.inner.detach_eni(att))
            .await
    }
    async fn delete_eni(&self, eni: &str) -> Result<(), CloudError> {
        self.call("DeleteNetworkInterface", || self.inner.delete_eni(eni))
            .await
    }
    async fn assign_ips(&self, eni: &str, n: u32) -> Result<Vec<Ipv4Addr>, CloudError> {
        self.call("AssignPrivateIpAddresses", || self.inner.assign_ips(eni, n))
            .await
    }
    async fn assign_prefixes(&self, eni: &str, n: u32) -> Result<Vec<Prefix>, CloudError> {
        self.call("AssignPrivateIpAddresses", || {
            self.inner.assign_prefixes(eni, n)
        })
        .await
    }
    async fn unassign_ips(&self, eni: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError> {
        self.call("UnassignPrivateIpAddresses", || {
            self.inner.unassign_ips(eni, ips)
        })
        .await
    }
    async fn unassign_prefixes(&self, eni: &str, p: &[Prefix]) -> Result<(), CloudError> {
        self.call("UnassignPrivateIpAddresses", || {
            self.inner.unassign_prefixes(eni, p)
        })
        .await
    }
    async fn assign_ipv6_prefixes(
        &self,
        eni: &str,
        n: u32,
    ) -> Result<Vec<ipnet::Ipv6Net>, CloudError> {
        self.call("AssignIpv6Addresses", || {
            self.inner.assign_ipv6_prefixes(eni, n)
        })
        .await
    }
    async fn describe_subnets(&self, f: SubnetFilter) -> Result<Vec<SubnetInfo>, CloudError> {
        self.call("DescribeSubnets", || self.inner.describe_subnets(f.clone()))
            .await
    }
    async fn describe_instance_type(&self, t: &str) -> Result<Option<InstanceLimits>, CloudError> {
        self.call("DescribeInstanceTypes", || {
            self.inner.describe_instance_type(t)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(3, 10.0);
        for _ in 0..3 {
            assert!(b.take(t0).is_ok());
        }
        let wait = b.take(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::from_millis(90));
        assert!(b.take(t0 + Duration::from_millis(100)).is_ok());
        // Idle time refills up to the burst, never beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(b.take(later).is_ok());
        }
        assert!(b.take(later).is_err());
    }

    #[test]
    fn throttling_halves_the_rate_and_successes_win_it_back() {
        let t0 = Instant::now();
        let mut b = Bucket::new(5, 10.0);
        b.throttled();
        assert_eq!(b.rate(), 5.0);
        assert!(b.take(t0).is_err(), "the bucket is emptied");
        for _ in 0..20 {
            b.throttled();
        }
        assert!(
            (b.rate() - MIN_RATE).abs() < 1e-9,
            "floored at one every 20 s"
        );
        for _ in 0..100 {
            b.succeeded();
        }
        assert_eq!(b.rate(), 10.0, "back to the configured rate, never above");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn describes_that_queue_behind_one_in_flight_share_the_next() {
        use crate::cloud::fake::FakeEc2;
        let fake = FakeEc2::new("i-1", 1);
        *fake.describe_latency.lock().unwrap() = Duration::from_millis(100);
        let g = std::sync::Arc::new(Guarded::new(
            fake,
            Bucket::new(100, 100.0),
            RetryPolicy::default(),
        ));
        let first = {
            let g = g.clone();
            tokio::spawn(async move { g.describe_enis(EniFilter::AttachedTo("i-1".into())).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Four more while the first is in flight: they asked after it started, so they wait for
        // one fresh describe and all take its answer.
        let rest: Vec<_> = (0..4)
            .map(|_| {
                let g = g.clone();
                tokio::spawn(
                    async move { g.describe_enis(EniFilter::AttachedTo("i-1".into())).await },
                )
            })
            .collect();
        assert_eq!(first.await.unwrap().unwrap().len(), 1);
        for r in rest {
            assert_eq!(r.await.unwrap().unwrap().len(), 1);
        }
        assert_eq!(g.inner.calls("DescribeNetworkInterfaces"), 2);
        // Another filter is never answered from the last one.
        g.describe_enis(EniFilter::Ids(vec!["eni-primary".into()]))
            .await
            .unwrap();
        assert_eq!(g.inner.calls("DescribeNetworkInterfaces"), 3);
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        assert_eq!(backoff(1, base, cap, 1.0), base);
        assert_eq!(backoff(3, base, cap, 1.0), Duration::from_millis(400));
        assert_eq!(backoff(30, base, cap, 1.0), cap);
        assert_eq!(backoff(3, base, cap, 0.0), Duration::from_millis(200));
    }
}

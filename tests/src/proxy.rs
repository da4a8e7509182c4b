//! A fault proxy between the workers and the emulator: every AWS call passes through it,
//! is counted by service and action, and may be answered the way a struggling AWS answers:
//!
//! - throttling, in each protocol's own shape: EC2's `RequestLimitExceeded` (HTTP 503, EC2 XML),
//!   the query services' `Throttling` / `Rate exceeded` (HTTP 400, `ErrorResponse` XML), the JSON
//!   services' `ThrottlingException` (SQS: `RequestThrottled`), HTTP 400;
//! - 500 and 503 replies (`InternalError` / `Unavailable`, `InternalFailure` /
//!   `ServiceUnavailable`);
//! - slow replies (the call is held before it is forwarded);
//! - dropped connections (closed without a reply);
//! - lost replies, for the one action [`FaultPlan::lose_replies_of`] names: the call is forwarded,
//!   the change made, and the connection closed before the reply, as when a network drops a
//!   reply on its way back; the caller's retry must not make the change twice.
//!
//! The other faults refuse calls before they reach the emulator, as in AWS, where a throttled or
//! failed request has no effect.
//!
//! Faults are drawn at the configured rates from a seeded generator, so a run can be replayed. In
//! [`FaultPlan::aws_limits`] mode the proxy instead enforces AWS's request-token buckets per
//! caller (each worker has its own role session, so a caller is one worker in one account) and
//! throttles only what goes over them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// What the proxy does to the calls it sees. Rates are fractions of all calls (0.0 to 1.0).
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    pub seed: u64,
    pub throttle: f64,
    pub server_error: f64,
    pub reset: f64,
    pub slow: f64,
    pub slow_by: Duration,
    /// Throttle calls over AWS's published request-token buckets (see [`aws_bucket`]) instead of
    /// at random.
    pub aws_limits: bool,
    /// The action (`CreateLaunchTemplateVersion`) whose replies are lost after the change, at
    /// the rate `lose_reply` (counted in [`CallStats::lost_replies`]).
    pub lose_replies_of: Option<String>,
    pub lose_reply: f64,
}

impl FaultPlan {
    /// `failing` of all calls fail (two fifths throttled, a third 5xx, the rest dropped), and
    /// a further 5% are slow.
    pub fn chaos(seed: u64, failing: f64) -> FaultPlan {
        FaultPlan {
            seed,
            throttle: failing * 0.4,
            server_error: failing * 0.35,
            reset: failing * 0.25,
            slow: 0.05,
            slow_by: Duration::from_millis(700),
            ..FaultPlan::default()
        }
    }

    /// The replies of `action` lost after the change, at `rate`, and no other fault.
    pub fn losing_replies_of(seed: u64, action: &str, rate: f64) -> FaultPlan {
        FaultPlan {
            seed,
            lose_replies_of: Some(action.to_owned()),
            lose_reply: rate,
            ..FaultPlan::default()
        }
    }

    /// Throttling at AWS's rates and nothing else.
    pub fn aws_limits() -> FaultPlan {
        FaultPlan {
            aws_limits: true,
            ..FaultPlan::default()
        }
    }
}

/// What happened to the calls of one (service, action).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallStats {
    pub calls: u64,
    pub forwarded: u64,
    pub throttled: u64,
    pub server_errors: u64,
    pub resets: u64,
    pub slowed: u64,
    /// Forwarded, made, and the reply lost.
    pub lost_replies: u64,
}

impl CallStats {
    pub fn failed(&self) -> u64 {
        self.throttled + self.server_errors + self.resets
    }

    fn add(&mut self, other: &CallStats) {
        self.calls += other.calls;
        self.forwarded += other.forwarded;
        self.throttled += other.throttled;
        self.server_errors += other.server_errors;
        self.resets += other.resets;
        self.slowed += other.slowed;
        self.lost_replies += other.lost_replies;
    }
}

/// Calls seen, by (signing service, action).
pub type Stats = BTreeMap<(String, String), CallStats>;

/// A forwarded call, for rate measurements: (when since the proxy started, service, action,
/// caller, throttled).
pub type CallRecord = (Duration, String, String, String, bool);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Throttle,
    ServerError,
    Reset,
    Slow,
}

/// AWS's request-token bucket for a call, as published: (bucket name, size, refill per second).
/// - EC2 (API reference, "Request throttling"): mutating actions share a bucket of 100 refilled
///   at 5/s; `Describe*` 100 at 20/s.
/// - SSM (Service quotas): `PutParameter` 3 transactions per second at standard throughput;
///   `GetParameter*` 40/s.
/// - Auto Scaling: one bucket for every action of the account; AWS publishes no size, so this
///   models 20 refilled at 10/s, the same guess as the runtime's limits.
///
/// Other calls (SQS, EventBridge, STS, KMS, CloudFormation) have quotas far above what amiflow
/// does and are not limited.
pub fn aws_bucket(service: &str, action: &str) -> Option<(&'static str, u32, u32)> {
    match service {
        "ec2" if action.starts_with("Describe") => Some(("ec2-describe", 100, 20)),
        "ec2" => Some(("ec2-mutating", 100, 5)),
        "ssm" if action == "PutParameter" => Some(("ssm-put-parameter", 3, 3)),
        "ssm" if action.starts_with("GetParameter") => Some(("ssm-get", 40, 40)),
        "autoscaling" => Some(("autoscaling", 20, 10)),
        _ => None,
    }
}

struct Buckets {
    /// One keyed limiter per bucket kind; the key is the caller.
    limiters: BTreeMap<&'static str, DefaultKeyedRateLimiter<String>>,
}

impl Buckets {
    fn new() -> Buckets {
        let mut limiters = BTreeMap::new();
        for (service, action) in [
            ("ec2", "DescribeImages"),
            ("ec2", "CreateLaunchTemplateVersion"),
            ("ssm", "PutParameter"),
            ("ssm", "GetParameter"),
            ("autoscaling", "DescribeAutoScalingGroups"),
        ] {
            let (name, size, refill) = aws_bucket(service, action).unwrap();
            let quota = Quota::per_second(NonZeroU32::new(refill).unwrap())
                .allow_burst(NonZeroU32::new(size).unwrap());
            limiters.insert(name, RateLimiter::keyed(quota));
        }
        Buckets { limiters }
    }

    /// Whether AWS would throttle this call now.
    fn over(&self, service: &str, action: &str, caller: &str) -> bool {
        let Some((name, ..)) = aws_bucket(service, action) else {
            return false;
        };
        self.limiters[name].check_key(&caller.to_owned()).is_err()
    }
}

struct State {
    plan: Mutex<FaultPlan>,
    rng: Mutex<fastrand::Rng>,
    stats: Mutex<Stats>,
    records: Mutex<Vec<CallRecord>>,
    buckets: Buckets,
    started: std::time::Instant,
    upstream: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Listen on a free loopback port and forward to `upstream` (`http://host:port`).
    pub async fn start(upstream: &str, plan: FaultPlan) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port for the fault proxy");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            rng: Mutex::new(fastrand::Rng::with_seed(plan.seed)),
            plan: Mutex::new(plan),
            stats: Mutex::new(Stats::new()),
            records: Mutex::new(Vec::new()),
            buckets: Buckets::new(),
            started: std::time::Instant::now(),
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { handle(&state, req).await }
                    });
                    // A dropped connection ends here with an error: that is the fault.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FaultProxy { addr, state, task }
    }

    /// The endpoint to give the workers (`AWS_ENDPOINT_URL`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Change what the proxy does from now on (the generator keeps its sequence).
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.state.plan.lock().unwrap() = plan;
    }

    /// Calls seen so far, by (service, action).
    pub fn stats(&self) -> Stats {
        self.state.stats.lock().unwrap().clone()
    }

    /// Every call seen so far, in order.
    pub fn records(&self) -> Vec<CallRecord> {
        self.state.records.lock().unwrap().clone()
    }

    /// All calls added up.
    pub fn total(&self) -> CallStats {
        let mut all = CallStats::default();
        for s in self.stats().values() {
            all.add(s);
        }
        all
    }
}

/// (signing service, action, caller access key) of a signed AWS request.
pub fn identify(headers: &hyper::HeaderMap, body: &[u8]) -> (String, String, String) {
    let auth = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    // AWS4-HMAC-SHA256 Credential=AKID/20261201/us-east-1/ec2/aws4_request, SignedHeaders=...
    let scope: Vec<&str> = auth
        .split("Credential=")
        .nth(1)
        .and_then(|c| c.split([',', ' ']).next())
        .unwrap_or_default()
        .split('/')
        .collect();
    let caller = scope.first().copied().unwrap_or_default().to_owned();
    let service = scope.get(3).copied().unwrap_or("unknown").to_owned();
    let action = match headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        // AmazonSSM.PutParameter, AWSEvents.PutEvents, AmazonSQS.ReceiveMessage
        Some(target) => target.rsplit('.').next().unwrap_or(target).to_owned(),
        // Query protocols (EC2, Auto Scaling, STS, CloudFormation): Action=... in the form body.
        None => String::from_utf8_lossy(body)
            .split('&')
            .find_map(|pair| pair.strip_prefix("Action="))
            .unwrap_or("unknown")
            .to_owned(),
    };
    (service, action, caller)
}

/// Which error format a service's SDK expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Ec2,
    Query,
    Json,
}

fn protocol(service: &str) -> Protocol {
    match service {
        "ec2" => Protocol::Ec2,
        "autoscaling" | "sts" | "cloudformation" | "iam" | "sns" => Protocol::Query,
        _ => Protocol::Json,
    }
}

/// The reply AWS gives for `fault` in `service`'s protocol.
fn error_reply(
    service: &str,
    fault: Fault,
    alternate: bool,
    content_type: Option<&HeaderValue>,
) -> Response<Full<Bytes>> {
    let request_id = uuid::Uuid::new_v4().to_string();
    let (status, code, message) = match (protocol(service), fault, alternate) {
        (Protocol::Ec2, Fault::Throttle, _) => {
            (503, "RequestLimitExceeded", "Request limit exceeded.")
        }
        (Protocol::Ec2, _, false) => (500, "InternalError", "An internal error has occurred"),
        (Protocol::Ec2, _, true) => (
            503,
            "Unavailable",
            "The server is overloaded and can't handle the request.",
        ),
        (Protocol::Query, Fault::Throttle, _) => (400, "Throttling", "Rate exceeded"),
        (Protocol::Query, _, false) => (500, "InternalFailure", "An internal error occurred"),
        (Protocol::Query, _, true) => (503, "ServiceUnavailable", "Service is unavailable"),
        (Protocol::Json, Fault::Throttle, _) if service == "sqs" => {
            (400, "RequestThrottled", "Rate exceeded")
        }
        (Protocol::Json, Fault::Throttle, _) => (400, "ThrottlingException", "Rate exceeded"),
        (Protocol::Json, _, false) => (500, "InternalFailure", "An internal error occurred"),
        (Protocol::Json, _, true) => (503, "ServiceUnavailableException", "Service is unavailable"),
    };
    let (body, kind) = match protocol(service) {
        Protocol::Ec2 => (
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"
            ),
            HeaderValue::from_static("text/xml;charset=UTF-8"),
        ),
        Protocol::Query => (
            format!(
                "<ErrorResponse><Error><Type>{}</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>",
                if status < 500 { "Sender" } else { "Receiver" }
            ),
            HeaderValue::from_static("text/xml"),
        ),
        Protocol::Json => (
            serde_json::json!({"__type": code, "message": message}).to_string(),
            content_type
                .cloned()
                .unwrap_or(HeaderValue::from_static("application/x-amz-json-1.1")),
        ),
    };
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    *reply.status_mut() = StatusCode::from_u16(status).unwrap();
    reply
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, kind);
    if let Ok(id) = HeaderValue::from_str(&request_id) {
        reply
            .headers_mut()
            .insert(HeaderName::from_static("x-amzn-requestid"), id);
    }
    reply
}

impl State {
    /// Draw the fault for one call, if any, and whether a 5xx is the alternate (503) kind.
    fn draw(&self, service: &str, action: &str, caller: &str) -> (Option<Fault>, bool) {
        let plan = self.plan.lock().unwrap().clone();
        if plan.aws_limits {
            return (
                self.buckets
                    .over(service, action, caller)
                    .then_some(Fault::Throttle),
                false,
            );
        }
        let mut rng = self.rng.lock().unwrap();
        let (roll, alternate) = (rng.f64(), rng.bool());
        let bands = [
            (plan.throttle, Fault::Throttle),
            (plan.server_error, Fault::ServerError),
            (plan.reset, Fault::Reset),
            (plan.slow, Fault::Slow),
        ];
        let mut edge = 0.0;
        let mut fault = None;
        for (rate, kind) in bands {
            edge += rate;
            if roll < edge {
                fault = Some(kind);
                break;
            }
        }
        (fault, alternate)
    }

    /// Whether to lose the reply of this forwarded call (drawn only for the named action).
    fn lose_reply(&self, action: &str) -> bool {
        let plan = self.plan.lock().unwrap().clone();
        if plan.lose_replies_of.as_deref() != Some(action) {
            return false;
        }
        let lost = self.rng.lock().unwrap().f64() < plan.lose_reply;
        if lost {
            let mut stats = self.stats.lock().unwrap();
            for (key, s) in stats.iter_mut() {
                if key.1 == action {
                    s.lost_replies += 1;
                    break;
                }
            }
        }
        lost
    }

    fn count(&self, service: &str, action: &str, caller: &str, fault: Option<Fault>) {
        let mut stats = self.stats.lock().unwrap();
        let s = stats
            .entry((service.to_owned(), action.to_owned()))
            .or_default();
        s.calls += 1;
        match fault {
            Some(Fault::Throttle) => s.throttled += 1,
            Some(Fault::ServerError) => s.server_errors += 1,
            Some(Fault::Reset) => s.resets += 1,
            Some(Fault::Slow) => {
                s.slowed += 1;
                s.forwarded += 1;
            }
            None => s.forwarded += 1,
        }
        drop(stats);
        self.records.lock().unwrap().push((
            self.started.elapsed(),
            service.to_owned(),
            action.to_owned(),
            caller.to_owned(),
            fault == Some(Fault::Throttle),
        ));
    }
}

/// Why a connection was dropped (hyper closes a connection whose service fails, with no reply).
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by the fault proxy")
    }
}

impl std::error::Error for Dropped {}

async fn handle(state: &State, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Dropped> {
    let (mut parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Err(Dropped),
    };
    let (service, action, caller) = identify(&parts.headers, &body);
    let (fault, alternate) = state.draw(&service, &action, &caller);
    state.count(&service, &action, &caller, fault);
    match fault {
        Some(Fault::Reset) => return Err(Dropped),
        Some(f @ (Fault::Throttle | Fault::ServerError)) => {
            return Ok(error_reply(
                &service,
                f,
                alternate,
                parts.headers.get(hyper::header::CONTENT_TYPE),
            ));
        }
        Some(Fault::Slow) => {
            let by = state.plan.lock().unwrap().slow_by;
            tokio::time::sleep(by).await;
        }
        None => {}
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    parts.uri = match format!("{}{path}", state.upstream).parse() {
        Ok(uri) => uri,
        Err(_) => return Ok(bad_gateway("unparsable request path")),
    };
    let forwarded = Request::from_parts(parts, Full::new(body));
    let reply = match state.client.request(forwarded).await {
        Ok(reply) => reply,
        Err(e) => return Ok(bad_gateway(&format!("the emulator did not answer: {e}"))),
    };
    if state.lose_reply(&action) {
        // The change is made; the caller never hears of it.
        return Err(Dropped);
    }
    let (mut parts, body) = reply.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(bad_gateway(&format!("the emulator's reply broke off: {e}"))),
    };
    // The body is whole now: hyper frames it again.
    parts.headers.remove(hyper::header::TRANSFER_ENCODING);
    parts.headers.remove(hyper::header::CONTENT_LENGTH);
    Ok(Response::from_parts(parts, Full::new(body)))
}

fn bad_gateway(why: &str) -> Response<Full<Bytes>> {
    let mut reply = Response::new(Full::new(Bytes::from(why.to_owned())));
    *reply.status_mut() = StatusCode::BAD_GATEWAY;
    reply
}

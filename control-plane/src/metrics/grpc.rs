//! Requests, status codes, latencies and calls in flight of the gRPC server,
//! by service and method, measured by a tower layer around every service.
//!
//! A call is counted when its answer is over: at the `grpc-status` of a
//! trailers-only answer (how tonic sends an error), at the trailers of a
//! full answer, or when the answer is dropped unfinished (`CANCELLED`: the
//! client went away). Its duration runs from the request's arrival to that
//! moment, so a stream's duration is the stream's length.
//!
//! Labels are bounded: the methods are read from the served services'
//! descriptors at start, and any other path is counted as `other`/`other`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use prost::Message;
use tonic::codegen::http::{self, HeaderMap};
use tonic::codegen::{Body, Bytes};

/// The label of a service or method not served here.
const OTHER: &str = "other";

/// The gRPC status code names, by number (`grpc-status`).
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The name of a `grpc-status` value; `UNKNOWN` for anything else.
fn code_name(status: &[u8]) -> &'static str {
    std::str::from_utf8(status)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .and_then(|n| CODES.get(n).copied())
        .unwrap_or("UNKNOWN")
}

fn status_in(headers: &HeaderMap) -> Option<&'static str> {
    headers
        .get("grpc-status")
        .map(|value| code_name(value.as_bytes()))
}

/// (service, method) labels of a served path, e.g.
/// `/posfleet.v1.AgentService/Heartbeat` → (`AgentService`, `Heartbeat`).
type Methods = HashMap<String, (&'static str, &'static str)>;

/// One method's series, resolved once at start so a call does not hash
/// its label values again (but for a code other than `OK`).
struct MethodSeries {
    service: &'static str,
    method: &'static str,
    ok: IntCounter,
    duration: Histogram,
    in_flight: IntGauge,
}

impl MethodSeries {
    fn new(
        requests: &IntCounterVec,
        duration: &HistogramVec,
        in_flight: &IntGaugeVec,
        (service, method): (&'static str, &'static str),
    ) -> MethodSeries {
        MethodSeries {
            service,
            method,
            ok: requests.with_label_values(&[service, method, "OK"]),
            duration: duration.with_label_values(&[service, method]),
            in_flight: in_flight.with_label_values(&[service]),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics {
    requests: IntCounterVec,
    /// Each served path's series.
    served: Arc<HashMap<String, Arc<MethodSeries>>>,
    /// The series of every other path.
    other: Arc<MethodSeries>,
}

impl GrpcMetrics {
    /// Registers the families; `descriptor_sets` are the encoded file
    /// descriptor sets of the services served, whose methods are the only
    /// label values besides `other`.
    pub fn register(registry: &Registry, descriptor_sets: &[&[u8]]) -> GrpcMetrics {
        let requests = IntCounterVec::new(
            Opts::new(
                "posfleet_grpc_server_requests_total",
                "gRPC calls answered, by service, method and status code.",
            ),
            &["service", "method", "code"],
        )
        .expect("static metric definition is valid");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "posfleet_grpc_server_request_duration_seconds",
                "Time from a gRPC call's arrival to the end of its answer, by service and method.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["service", "method"],
        )
        .expect("static metric definition is valid");
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "posfleet_grpc_server_requests_in_flight",
                "gRPC calls started and not yet answered, by service.",
            ),
            &["service"],
        )
        .expect("static metric definition is valid");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(in_flight.clone()),
        ] {
            registry
                .register(collector)
                .expect("each metric is registered once");
        }
        // Every served method exists from the start, so rates work from zero.
        let served = served_methods(descriptor_sets)
            .into_iter()
            .map(|(path, labels)| {
                let series = MethodSeries::new(&requests, &duration, &in_flight, labels);
                (path, Arc::new(series))
            })
            .collect();
        let other = MethodSeries::new(&requests, &duration, &in_flight, (OTHER, OTHER));
        GrpcMetrics {
            requests,
            served: Arc::new(served),
            other: Arc::new(other),
        }
    }

    fn series(&self, path: &str) -> Arc<MethodSeries> {
        self.served.get(path).unwrap_or(&self.other).clone()
    }
}

/// Every `/<package>.<Service>/<Method>` path of the descriptor sets.
fn served_methods(descriptor_sets: &[&[u8]]) -> Methods {
    let mut methods = Methods::new();
    for set in descriptor_sets {
        let set = prost_types::FileDescriptorSet::decode(*set)
            .expect("the embedded descriptor sets are valid");
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let service_name = service.name.unwrap_or_default();
                // Label values live as long as the process: leaked once.
                let short: &'static str = Box::leak(service_name.clone().into_boxed_str());
                for method in service.method {
                    let method_name = method.name.unwrap_or_default();
                    let path = if package.is_empty() {
                        format!("/{service_name}/{method_name}")
                    } else {
                        format!("/{package}.{service_name}/{method_name}")
                    };
                    methods.insert(path, (short, Box::leak(method_name.into_boxed_str())));
                }
            }
        }
    }
    methods
}

/// Counts and times every call of the services it wraps.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: GrpcMetrics,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: GrpcMetrics) -> GrpcMetricsLayer {
        GrpcMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> GrpcMetricsService<S> {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: GrpcMetrics,
}

/// One call being measured: recorded once, when dropped.
struct Call {
    requests: IntCounterVec,
    series: Arc<MethodSeries>,
    started: Instant,
    /// The status code, once known.
    code: Option<&'static str>,
}

impl Call {
    fn start(metrics: &GrpcMetrics, path: &str) -> Call {
        let series = metrics.series(path);
        series.in_flight.inc();
        Call {
            requests: metrics.requests.clone(),
            series,
            started: Instant::now(),
            code: None,
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let s = &self.series;
        // Dropped before a status was seen: the client went away.
        match self.code.unwrap_or("CANCELLED") {
            "OK" => s.ok.inc(),
            code => self
                .requests
                .with_label_values(&[s.service, s.method, code])
                .inc(),
        }
        s.duration.observe(self.started.elapsed().as_secs_f64());
        s.in_flight.dec();
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    type Response = http::Response<MeasuredBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let mut call = Call::start(&self.metrics, request.uri().path());
        let answer = self.inner.call(request);
        Box::pin(async move {
            // An error here is a transport failure: the call is counted
            // as cancelled when `call` drops.
            let response = answer.await?;
            // A trailers-only answer carries its status as a header.
            call.code = status_in(response.headers());
            let call = if call.code.is_some() {
                drop(call);
                None
            } else {
                Some(call)
            };
            Ok(response.map(|inner| MeasuredBody { inner, call }))
        })
    }
}

pin_project_lite::pin_project! {
    /// An answer's body that records its call when the trailers pass, or
    /// when it is dropped.
    pub struct MeasuredBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }
}

impl<B: Body<Data = Bytes>> Body for MeasuredBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(mut call) = this.call.take()
                {
                    call.code = Some(status_in(trailers).unwrap_or("UNKNOWN"));
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut call) = this.call.take() {
                    call.code = Some("INTERNAL");
                }
            }
            // Ended without trailers: not a gRPC answer.
            Poll::Ready(None) => {
                if let Some(mut call) = this.call.take() {
                    call.code = Some("UNKNOWN");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_numbers_name_their_codes() {
        assert_eq!(code_name(b"0"), "OK");
        assert_eq!(code_name(b"16"), "UNAUTHENTICATED");
        assert_eq!(code_name(b"4"), "DEADLINE_EXCEEDED");
        assert_eq!(code_name(b"17"), "UNKNOWN");
        assert_eq!(code_name(b"x"), "UNKNOWN");
    }

    #[test]
    fn served_methods_are_read_from_the_descriptors() {
        let methods = served_methods(&[posfleet_proto::FILE_DESCRIPTOR_SET]);
        assert_eq!(
            methods.get("/posfleet.v1.AgentService/Heartbeat"),
            Some(&("AgentService", "Heartbeat"))
        );
        assert_eq!(
            methods.get("/posfleet.v1.AdminService/CreateRollout"),
            Some(&("AdminService", "CreateRollout"))
        );
        assert!(!methods.contains_key("/posfleet.v1.AgentService/Nope"));
    }
}

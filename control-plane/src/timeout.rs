//! How long a gRPC call may take.
//!
//! A call gets [`REQUEST_TIMEOUT`] from its first byte to its answer, and
//! is answered `DEADLINE_EXCEEDED` after that. A client-streaming upload
//! (`PublishBundle`, a till's `UploadLogs`) is exempt: its length grows
//! with what it carries and the link, so its handler applies an idle
//! timeout instead
//! ([`STREAM_IDLE_TIMEOUT`] without a message ends it). A deadline the
//! client sends (`grpc-timeout`) still applies to every call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::Status;
use tonic::codegen::http;

/// Longest time from a call's start to its answer (streams excepted).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the next message of a client-streaming upload.
pub const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Calls that stream their request and so get an idle timeout instead.
pub const STREAMING_UPLOADS: &[&str] = &[
    "/posfleet.v1.AdminService/PublishBundle",
    "/posfleet.v1.AgentService/UploadLogs",
];

/// Applies [`REQUEST_TIMEOUT`] to every call but [`STREAMING_UPLOADS`].
#[derive(Clone, Copy, Debug)]
pub struct RequestTimeoutLayer {
    timeout: Duration,
}

impl RequestTimeoutLayer {
    pub fn new(timeout: Duration) -> RequestTimeoutLayer {
        RequestTimeoutLayer { timeout }
    }
}

impl<S> tower::Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> RequestTimeout<S> {
        RequestTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RequestTimeout<S> {
    inner: S,
    timeout: Duration,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RequestTimeout<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let streaming = STREAMING_UPLOADS.contains(&request.uri().path());
        let call = self.inner.call(request);
        if streaming {
            return Box::pin(call);
        }
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, call).await {
                Ok(answer) => answer,
                Err(_) => Ok(Status::deadline_exceeded(format!(
                    "the call took longer than {} s",
                    timeout.as_secs()
                ))
                .into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::{Service, ServiceExt};

    /// A service that answers after `delay`.
    fn slow(
        delay: Duration,
    ) -> impl Service<
        http::Request<()>,
        Response = http::Response<String>,
        Error = Infallible,
        Future = impl Send,
    > + Clone {
        tower::service_fn(move |_: http::Request<()>| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, Infallible>(http::Response::new("answer".to_string()))
        })
    }

    async fn status_of(path: &str, delay: Duration) -> Option<String> {
        let service = tower::Layer::layer(
            &RequestTimeoutLayer::new(Duration::from_millis(100)),
            slow(delay),
        );
        let request = http::Request::builder().uri(path).body(()).unwrap();
        let response = service.oneshot(request).await.unwrap();
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string())
    }

    #[tokio::test]
    async fn calls_time_out_but_streaming_uploads_do_not() {
        let long = Duration::from_millis(1000);
        // DEADLINE_EXCEEDED is 4.
        assert_eq!(
            status_of("/posfleet.v1.AdminService/CreateStore", long).await,
            Some("4".to_string())
        );
        assert_eq!(
            status_of(
                "/posfleet.v1.AdminService/CreateStore",
                Duration::from_millis(1)
            )
            .await,
            None
        );
        assert_eq!(
            status_of("/posfleet.v1.AdminService/PublishBundle", long).await,
            None
        );
    }
}

//! Replicas on one PostgreSQL database tell each other of changes their
//! caches hold: a change made through one shows on the others within a
//! second, not a cache's lifetime.

mod common;

use common::{Backend, TestServer, heartbeat, setup};
use posfleet_proto::v1;
use std::time::{Duration, Instant};
use tonic::Code;

/// How soon a change must show on another replica.
const PROPAGATION: Duration = Duration::from_secs(1);

/// A till is revoked through one replica while the other, which just
/// answered its heartbeat from its cache, keeps serving it: the other
/// refuses it within a second (its cache alone would keep it for
/// `DESIRED_CACHE_TTL`, 5 s).
async fn a_device_revoked_through_one_replica_is_refused_by_the_other_within_a_second(
    backend: Backend,
) {
    let s = setup(backend, |_| {}).await;
    let replica = TestServer::start(s.server.config.clone()).await;
    let mut admin = s.server.admin().await;
    admin.store("s1").await;
    let (device, credential) = s.enrolled_device("s1").await;
    let mut on_replica = replica.agent().await;
    // The replica now holds the store's desired state and the credential.
    for _ in 0..2 {
        on_replica
            .heartbeat(heartbeat(&credential, Default::default()))
            .await
            .expect("served before the revocation");
    }
    admin
        .client
        .revoke_device(admin.req(v1::RevokeDeviceRequest {
            device_id: device.clone(),
            reason: "stolen".into(),
        }))
        .await
        .expect("revoked");
    let revoked_at = Instant::now();
    let refused_after = loop {
        match on_replica
            .heartbeat(heartbeat(&credential, Default::default()))
            .await
        {
            Err(status) => {
                assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
                assert!(status.message().contains("stolen"), "{status:?}");
                break revoked_at.elapsed();
            }
            Ok(_) if revoked_at.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(_) => panic!("the replica still serves a revoked device after 10 s"),
        }
    };
    assert!(
        refused_after <= PROPAGATION,
        "the other replica refused the revoked device only after {refused_after:?}"
    );
    replica.stop().await;
    s.finish().await;
}

mod postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs PostgreSQL: set POSFLEET_TEST_POSTGRES_URL and pass --ignored (.ci/run does)"]
    async fn a_device_revoked_through_one_replica_is_refused_by_the_other_within_a_second() {
        super::a_device_revoked_through_one_replica_is_refused_by_the_other_within_a_second(
            super::Backend::Postgres,
        )
        .await
    }
}

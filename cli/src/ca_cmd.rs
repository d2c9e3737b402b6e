//! `posfleet ca status|rotate|retire`: the fleet's CAs, and replacing the
//! one that issues tills' certificates without re-enrolling them.

use clap::Subcommand;
use posfleet_proto::v1;
use serde::Serialize;

use crate::view::{table, time};
use crate::{Admin, Output, show};

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// The CAs in force and how many tills hold a certificate from each.
    Status,
    /// Print the trust bundle (PEM) for operators' `--ca-file` and new
    /// tills' `ca_cert_path`: during a rotation it holds the old and the
    /// new CA; take it again after `ca retire`.
    Bundle,
    /// Make a new CA that issues tills' certificates from now on. The
    /// current one stays trusted: tills get the new CA at their next
    /// heartbeat and renew their certificate from it. Then `ca retire`.
    Rotate,
    /// Stop trusting the CA being rotated out. Refused while an enrolled
    /// till still holds a certificate from it.
    Retire {
        /// Retire anyway: the tills still holding such a certificate must
        /// enroll again (they are listed).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Serialize)]
pub struct CaView {
    pub role: String,
    pub fingerprint: String,
    pub subject: String,
    pub expires_at: String,
    pub devices: u64,
}

#[derive(Debug, Serialize)]
pub struct AuthoritiesView {
    pub source: String,
    pub trust_bundle_sha256: String,
    pub authorities: Vec<CaView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices_to_reenroll: Vec<String>,
}

impl From<v1::CertificateAuthorities> for AuthoritiesView {
    fn from(a: v1::CertificateAuthorities) -> Self {
        AuthoritiesView {
            source: a.source,
            trust_bundle_sha256: a.trust_bundle_sha256,
            authorities: a
                .authorities
                .into_iter()
                .map(|ca| CaView {
                    role: ca.role,
                    fingerprint: ca.fingerprint,
                    subject: ca.subject,
                    expires_at: time(ca.not_after_unix_ms),
                    devices: ca.devices,
                })
                .collect(),
            devices_to_reenroll: a.devices_to_reenroll,
        }
    }
}

fn text(view: &AuthoritiesView) -> String {
    let mut t = table(&[
        "ROLE",
        "FINGERPRINT (SHA-256)",
        "SUBJECT",
        "EXPIRES",
        "TILLS",
    ]);
    for ca in &view.authorities {
        t.add_row(vec![
            ca.role.clone(),
            ca.fingerprint.clone(),
            ca.subject.clone(),
            ca.expires_at.clone(),
            ca.devices.to_string(),
        ]);
    }
    let mut out = format!("{t}\nKept in: {}\n", view.source);
    if let Some(previous) = view.authorities.iter().find(|ca| ca.role == "previous") {
        out.push_str(&match previous.devices {
            0 => "No till holds a certificate from the previous CA: `posfleet ca retire` may retire it.\n".to_string(),
            n => format!(
                "{n} till(s) still hold a certificate from the previous CA; online tills renew at their next heartbeat.\n"
            ),
        });
    }
    if !view.devices_to_reenroll.is_empty() {
        out.push_str(&format!(
            "These tills must enroll again: {}\n",
            view.devices_to_reenroll.join(", ")
        ));
    }
    out
}

pub async fn run(admin: &mut Admin, command: CaCommand, output: Output) -> anyhow::Result<()> {
    let answer = match command {
        CaCommand::Bundle => {
            let request = admin.request(v1::GetCertificateAuthoritiesRequest {});
            let answer = admin.client.get_certificate_authorities(request).await;
            print!("{}", admin.answer(answer)?.trust_bundle_pem);
            return Ok(());
        }
        CaCommand::Status => {
            let request = admin.request(v1::GetCertificateAuthoritiesRequest {});
            let answer = admin.client.get_certificate_authorities(request).await;
            admin.answer(answer)?
        }
        CaCommand::Rotate => {
            let request = admin.request(v1::RotateCertificateAuthorityRequest {});
            let answer = admin.client.rotate_certificate_authority(request).await;
            admin.answer(answer)?
        }
        CaCommand::Retire { force } => {
            let request = admin.request(v1::RetireCertificateAuthorityRequest { force });
            let answer = admin.client.retire_certificate_authority(request).await;
            admin.answer(answer)?
        }
    };
    let view = AuthoritiesView::from(answer);
    show(output, &view, || text(&view))
}

//! `posfleet webhook …`: receivers of events, and how deliveries went.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use posfleet_proto::v1;
use serde::Serialize;

use crate::view::{table, time};
use crate::{Admin, Output, show};

#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// Deliver events to an http:// or https:// URL as signed JSON POSTs;
    /// the signing secret is printed once.
    Add {
        url: String,
        /// Event kinds (`rollout.paused`) or prefixes (`rollout.*`),
        /// comma-separated; every event when left out.
        #[arg(long, value_delimiter = ',')]
        events: Vec<String>,
        /// PEM file of a CA to trust for an https:// receiver beside the
        /// system's roots (a company CA); its certificates only.
        #[arg(long, value_name = "PATH")]
        receiver_ca_file: Option<PathBuf>,
    },
    /// List webhooks.
    List,
    /// Remove a webhook and its deliveries.
    Remove { id: String },
    /// Deliveries, newest event first: state, attempts, last answer, next
    /// attempt.
    Deliveries {
        /// Only this webhook's.
        #[arg(long)]
        webhook: Option<String>,
        /// At most this many (the server caps it at 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Debug, Serialize)]
pub struct WebhookView {
    pub id: String,
    pub url: String,
    /// Empty: every event.
    pub events: Vec<String>,
    pub created_at: String,
    /// The CA certificates its https:// receiver is checked against beside
    /// the system's roots; empty: the system's roots only.
    pub receiver_cas: Vec<CaView>,
    /// Only when just added: the HMAC-SHA256 key, shown once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CaView {
    pub subject: String,
    pub sha256_fingerprint: String,
    pub not_after: String,
}

impl From<v1::Webhook> for WebhookView {
    fn from(w: v1::Webhook) -> Self {
        WebhookView {
            id: w.id,
            url: w.url,
            events: w.events,
            created_at: time(w.created_at_unix_ms),
            receiver_cas: w
                .cas
                .into_iter()
                .map(|ca| CaView {
                    subject: ca.subject,
                    sha256_fingerprint: ca.sha256_fingerprint,
                    not_after: time(ca.not_after_unix_ms),
                })
                .collect(),
            secret: None,
        }
    }
}

/// The receiver's trust, in a table cell: its own CA by subject and the
/// start of its fingerprint, or the system's roots.
fn receiver_ca(w: &WebhookView) -> String {
    match w.receiver_cas.as_slice() {
        [] if w.url.starts_with("https://") => "system roots".to_string(),
        [] => String::new(),
        [first, rest @ ..] => {
            let fingerprint: String = first.sha256_fingerprint.chars().take(16).collect();
            let more = match rest.len() {
                0 => String::new(),
                n => format!(" +{n} more"),
            };
            format!("{} (sha256 {fingerprint}…){more}", first.subject)
        }
    }
}

pub fn webhooks_table(webhooks: &[WebhookView]) -> comfy_table::Table {
    let mut t = table(&["WEBHOOK", "URL", "EVENTS", "RECEIVER CA", "CREATED"]);
    for w in webhooks {
        let events = if w.events.is_empty() {
            "all".to_string()
        } else {
            w.events.join(",")
        };
        t.add_row(vec![
            w.id.clone(),
            w.url.clone(),
            events,
            receiver_ca(w),
            w.created_at.clone(),
        ]);
    }
    t
}

#[derive(Debug, Serialize)]
pub struct DeliveryView {
    pub webhook_id: String,
    pub event_seq: u64,
    pub event_kind: String,
    /// `pending`, `delivered` or `failed` (given up).
    pub state: String,
    pub attempts: u32,
    /// Of the last attempt; 0 when it got no HTTP answer.
    pub last_http_status: u32,
    pub last_error: String,
    pub last_attempt_at: String,
    pub next_attempt_at: String,
}

impl From<v1::WebhookDelivery> for DeliveryView {
    fn from(d: v1::WebhookDelivery) -> Self {
        let state = v1::DeliveryState::try_from(d.state)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("DELIVERY_STATE_")
                    .to_ascii_lowercase()
            })
            .unwrap_or_else(|_| d.state.to_string());
        DeliveryView {
            webhook_id: d.webhook_id,
            event_seq: d.event_seq,
            event_kind: d.event_kind,
            state,
            attempts: d.attempts,
            last_http_status: d.last_http_status,
            last_error: d.last_error,
            last_attempt_at: time(d.last_attempt_at_unix_ms),
            next_attempt_at: time(d.next_attempt_at_unix_ms),
        }
    }
}

fn cut(text: &str, max: usize) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= max {
        return line;
    }
    let kept: String = line.chars().take(max.saturating_sub(1)).collect();
    format!("{kept}…")
}

pub fn deliveries_table(deliveries: &[DeliveryView]) -> comfy_table::Table {
    let mut t = table(&[
        "WEBHOOK",
        "EVENT",
        "KIND",
        "STATE",
        "ATTEMPTS",
        "LAST ANSWER",
        "LAST ATTEMPT",
        "NEXT ATTEMPT",
    ]);
    for d in deliveries {
        let answer = match (d.last_http_status, d.last_error.as_str()) {
            (0, "") => String::new(),
            (0, error) => cut(error, 50),
            (status, _) => status.to_string(),
        };
        t.add_row(vec![
            d.webhook_id.clone(),
            d.event_seq.to_string(),
            d.event_kind.clone(),
            d.state.clone(),
            d.attempts.to_string(),
            answer,
            d.last_attempt_at.clone(),
            d.next_attempt_at.clone(),
        ]);
    }
    t
}

impl Admin {
    pub async fn add_webhook(
        &mut self,
        url: String,
        events: Vec<String>,
        ca_pem: String,
    ) -> anyhow::Result<v1::AddWebhookResponse> {
        let request = self.request(v1::AddWebhookRequest {
            url,
            events,
            ca_pem,
        });
        let answer = self.client.add_webhook(request).await;
        self.answer(answer)
    }

    pub async fn list_webhooks(&mut self) -> anyhow::Result<Vec<v1::Webhook>> {
        let request = self.request(v1::ListWebhooksRequest {});
        let answer = self.client.list_webhooks(request).await;
        self.answer(answer).map(|r| r.webhooks)
    }

    pub async fn remove_webhook(&mut self, id: String) -> anyhow::Result<v1::Webhook> {
        let request = self.request(v1::RemoveWebhookRequest { id });
        let answer = self.client.remove_webhook(request).await;
        self.answer(answer)
    }

    pub async fn list_webhook_deliveries(
        &mut self,
        webhook_id: String,
        limit: u32,
    ) -> anyhow::Result<Vec<v1::WebhookDelivery>> {
        let request = self.request(v1::ListWebhookDeliveriesRequest { webhook_id, limit });
        let answer = self.client.list_webhook_deliveries(request).await;
        self.answer(answer).map(|r| r.deliveries)
    }
}

pub async fn run(admin: &mut Admin, command: WebhookCommand, output: Output) -> anyhow::Result<()> {
    match command {
        WebhookCommand::Add {
            url,
            events,
            receiver_ca_file,
        } => {
            let ca_pem = match receiver_ca_file {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read the CA file {}", path.display()))?,
                None => String::new(),
            };
            let added = admin.add_webhook(url, events, ca_pem).await?;
            let mut webhook = WebhookView::from(added.webhook.unwrap_or_default());
            webhook.secret = Some(added.secret.clone());
            show(output, &webhook, || {
                format!(
                    "{}\nSigning secret (shown once; the receiver checks X-Posfleet-Signature \
                     with it):\n{}\n",
                    webhooks_table(std::slice::from_ref(&webhook)),
                    added.secret
                )
            })
        }
        WebhookCommand::List => {
            let webhooks: Vec<WebhookView> = admin
                .list_webhooks()
                .await?
                .into_iter()
                .map(Into::into)
                .collect();
            show(output, &webhooks, || {
                format!("{}\n", webhooks_table(&webhooks))
            })
        }
        WebhookCommand::Remove { id } => {
            let webhook = WebhookView::from(admin.remove_webhook(id).await?);
            show(output, &webhook, || {
                format!(
                    "Removed:\n{}\n",
                    webhooks_table(std::slice::from_ref(&webhook))
                )
            })
        }
        WebhookCommand::Deliveries { webhook, limit } => {
            let deliveries: Vec<DeliveryView> = admin
                .list_webhook_deliveries(webhook.unwrap_or_default(), limit)
                .await?
                .into_iter()
                .map(Into::into)
                .collect();
            show(output, &deliveries, || {
                format!("{}\n", deliveries_table(&deliveries))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[test]
    fn the_commands_parse() {
        let parse = |line: &str| crate::Cli::try_parse_from(line.split_whitespace());
        for ok in [
            "posfleet webhook add http://h/x --events rollout.*,rollout.paused",
            "posfleet webhook add http://h/x",
            "posfleet webhook add https://h/x --receiver-ca-file ca.pem",
            "posfleet --ca-file fleet.pem webhook add https://h/x --receiver-ca-file ca.pem",
            "posfleet webhook list",
            "posfleet webhook remove wh-1",
            "posfleet webhook deliveries",
            "posfleet webhook deliveries --webhook wh-1 --limit 10",
            "posfleet audit list",
            "posfleet audit list --after 10 --limit 5 --output json",
        ] {
            assert!(parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "posfleet webhook add",
            "posfleet webhook add https://h/x --receiver-ca-file",
            "posfleet webhook remove",
            "posfleet audit list --after x",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let Ok(cli) = parse("posfleet webhook add http://h/x --events a.*,b.c") else {
            panic!("parses")
        };
        let crate::Command::Admin(crate::AdminCommand::Webhook(super::WebhookCommand::Add {
            events,
            ..
        })) = cli.command
        else {
            panic!("a webhook add: {:?}", cli.command)
        };
        assert_eq!(events, ["a.*", "b.c"]);
    }
}

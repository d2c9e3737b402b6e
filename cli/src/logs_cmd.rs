//! `posfleet device logs`: asks a till for its logs and prints the lines as
//! they arrive. The till answers at its next heartbeat; an offline till's
//! request waits in the control plane, and `--request ID` fetches its lines
//! later.

use anyhow::bail;
use posfleet_proto::v1;
use serde::Serialize;
use std::time::Duration;

use crate::view::time;
use crate::{Admin, Output};

/// How long to wait for an online till to start answering, by default
/// (it answers at its next heartbeat).
const DEFAULT_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The device to ask.
    #[arg(required_unless_present = "request")]
    device: Option<String>,
    /// Only lines the till stored this long before now at most, e.g. `2h`.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "request")]
    since: Option<Duration>,
    /// The newest this many matching lines (1 to 10000).
    #[arg(long, default_value_t = 200, conflicts_with = "request")]
    lines: u32,
    /// Only lines containing this text (searched after redaction).
    #[arg(long, conflicts_with = "request")]
    grep: Option<String>,
    /// Then keep printing new lines, for as long as the control plane
    /// allows (`log_follow_max_seconds`, 10 minutes by default).
    #[arg(long, conflicts_with = "request")]
    follow: bool,
    /// How long to wait for the till to start answering (at most 1h): by
    /// default 1m for an online till, none for an offline one (the request
    /// waits for it).
    #[arg(long, value_parser = humantime::parse_duration)]
    wait: Option<Duration>,
    /// Print the lines of an earlier request (its id was printed when it
    /// was made) instead of making one.
    #[arg(long, value_name = "ID", conflicts_with = "device")]
    request: Option<String>,
}

/// One line, as `--output json` prints it (one object per line).
#[derive(Debug, Serialize)]
struct LineView<'a> {
    time: String,
    unix_ms: i64,
    source: &'a str,
    text: &'a str,
}

pub async fn run(admin: &mut Admin, args: LogsArgs, output: Output) -> anyhow::Result<()> {
    let (id, wait) = match (args.request, args.device) {
        (Some(id), _) => (id, args.wait.unwrap_or(Duration::ZERO)),
        (None, Some(device)) => {
            let request = admin.request(v1::RequestDeviceLogsRequest {
                device_id: device.clone(),
                since_seconds: args.since.map_or(0, |since| since.as_secs().max(1)),
                max_lines: args.lines,
                grep: args.grep.unwrap_or_default(),
                follow: args.follow,
            });
            let answer = admin.client.request_device_logs(request).await;
            let info = admin.answer(answer)?;
            let wait = if info.device_online {
                eprintln!(
                    "Asked {device} for its logs (request {}); it answers at its next heartbeat.",
                    info.id
                );
                args.wait.unwrap_or(DEFAULT_WAIT)
            } else {
                eprintln!(
                    "{device} is offline ({}): request {} waits for it until {}. \
                     Once it is back, `posfleet device logs --request {}` prints the lines.",
                    last_seen(info.device_last_seen_unix_ms),
                    info.id,
                    time(info.expires_at_unix_ms),
                    info.id
                );
                args.wait.unwrap_or(Duration::ZERO)
            };
            (info.id, wait)
        }
        (None, None) => bail!("name a device, or --request ID"),
    };
    let request = admin.streaming_request(v1::GetDeviceLogsRequest {
        request_id: id.clone(),
        wait_seconds: u32::try_from(wait.as_secs()).unwrap_or(u32::MAX),
    });
    let answer = admin.client.get_device_logs(request).await;
    let mut stream = admin.answer(answer)?;
    let mut last = None;
    let mut printed = 0u64;
    while let Some(chunk) = stream.message().await.map_err(|s| admin.error(s))? {
        for line in &chunk.lines {
            print_line(line, output)?;
            printed += 1;
        }
        if chunk.request.is_some() {
            last = chunk.request;
        }
    }
    let Some(info) = last else {
        bail!(
            "the control plane ended the answer without the request's state; run `posfleet device logs --request {id}` again"
        )
    };
    let again = format!("posfleet device logs --request {id}");
    match info.state.as_str() {
        "pending" => eprintln!(
            "The till has not answered yet: request {id} waits for it until {}. \
             Run `{again}` later.",
            time(info.expires_at_unix_ms)
        ),
        "uploading" => eprintln!(
            "The till is still uploading (its upload may have broken off: it starts over at its \
             next heartbeat). Run `{again}` for the rest."
        ),
        "expired" => bail!(
            "log request {id} expired at {} before the till answered; ask again once it is online",
            time(info.expires_at_unix_ms)
        ),
        _ => {
            if !info.note.is_empty() {
                eprintln!("Note: {}.", info.note);
            }
            if printed == 0 {
                eprintln!("No stored line matched the request.");
            }
        }
    }
    Ok(())
}

fn print_line(line: &v1::LogLine, output: Output) -> anyhow::Result<()> {
    let at = chrono::DateTime::from_timestamp_millis(line.unix_ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| line.unix_ms.to_string());
    match output {
        Output::Table => println!("{at} {} {}", line.source, line.text),
        Output::Json => println!(
            "{}",
            serde_json::to_string(&LineView {
                time: at,
                unix_ms: line.unix_ms,
                source: &line.source,
                text: &line.text,
            })?
        ),
    }
    Ok(())
}

/// "last seen 14 min ago", or "never seen" for a till that never sent a
/// heartbeat.
fn last_seen(last_seen_ms: i64) -> String {
    if last_seen_ms <= 0 {
        return "never seen".into();
    }
    let minutes = (chrono::Utc::now().timestamp_millis() - last_seen_ms).max(0) / 60_000;
    match minutes {
        0 => "last seen less than a minute ago".into(),
        1..=119 => format!("last seen {minutes} min ago"),
        120..=2879 => format!("last seen {} h ago", minutes / 60),
        _ => format!("last seen {} days ago", minutes / 1440),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_seen_reads_as_a_person_would_say_it() {
        let now = chrono::Utc::now().timestamp_millis();
        let ago = |minutes: i64| last_seen(now - minutes * 60_000 - 1_000);
        assert_eq!(ago(0), "last seen less than a minute ago");
        assert_eq!(ago(14), "last seen 14 min ago");
        assert_eq!(ago(180), "last seen 3 h ago");
        assert_eq!(ago(3 * 1440), "last seen 3 days ago");
        assert_eq!(last_seen(0), "never seen");
    }
}

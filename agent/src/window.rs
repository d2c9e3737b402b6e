//! Maintenance windows: a daily span of the store's local time in which
//! installs may happen. Pure functions of an instant, tested across
//! midnight and daylight-saving changes.

use chrono::{DateTime, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// A daily window: from `start_minute` after local midnight, for
/// `duration_minutes` of local wall-clock time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    pub time_zone: String,
    pub start_minute: u32,
    pub duration_minutes: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WindowError {
    #[error("unknown time zone `{0}`")]
    TimeZone(String),
    #[error("start_minute {0} is not 0..1439")]
    Start(u32),
    #[error("duration_minutes {0} is not 1..1440")]
    Duration(u32),
}

/// The instant a local wall-clock time stands for. A time skipped by a
/// DST change (02:30 on a spring-forward night) moves to the first local
/// time that exists after it; a time that occurs twice takes the first.
fn resolve(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    let mut probe = local;
    // A DST gap is at most a few hours; probing minute by minute ends well
    // within a day.
    for _ in 0..(24 * 60) {
        match tz.from_local_datetime(&probe) {
            LocalResult::Single(t) => return t.with_timezone(&Utc),
            LocalResult::Ambiguous(first, _) => return first.with_timezone(&Utc),
            LocalResult::None => probe += Duration::minutes(1),
        }
    }
    // Unreachable for any real time zone; treat the time as UTC.
    local.and_utc()
}

impl Window {
    pub fn validate(&self) -> Result<Tz, WindowError> {
        let tz: Tz = self
            .time_zone
            .parse()
            .map_err(|_| WindowError::TimeZone(self.time_zone.clone()))?;
        if self.start_minute >= 1440 {
            return Err(WindowError::Start(self.start_minute));
        }
        if !(1..=1440).contains(&self.duration_minutes) {
            return Err(WindowError::Duration(self.duration_minutes));
        }
        Ok(tz)
    }

    /// The window that opens on local date `day`, as UTC instants.
    fn on(&self, tz: Tz, day: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
        let start = day.and_hms_opt(0, 0, 0).unwrap_or_default()
            + Duration::minutes(i64::from(self.start_minute));
        let end = start + Duration::minutes(i64::from(self.duration_minutes));
        (resolve(tz, start), resolve(tz, end))
    }

    /// Whether `now` falls inside the window. An invalid window is never
    /// open (the control plane validates windows; this is defence).
    pub fn is_open(&self, now: DateTime<Utc>) -> bool {
        let Ok(tz) = self.validate() else {
            return false;
        };
        let today = now.with_timezone(&tz).date_naive();
        // A window lasts at most a day, so only one opening yesterday or
        // today can cover `now`.
        [today.pred_opt(), Some(today)]
            .into_iter()
            .flatten()
            .any(|day| {
                let (start, end) = self.on(tz, day);
                start <= now && now < end
            })
    }

    /// The next instant at or after `now` at which the window is open.
    pub fn next_open(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let tz = self.validate().ok()?;
        if self.is_open(now) {
            return Some(now);
        }
        let today = now.with_timezone(&tz).date_naive();
        (0..3)
            .filter_map(|n| today.checked_add_days(chrono::Days::new(n)))
            .map(|day| self.on(tz, day))
            .filter(|(start, end)| *start >= now && start < end)
            .map(|(start, _)| start)
            .min()
    }
}

/// Renders minutes after midnight as `HH:MM`.
pub fn clock(minute: u32) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(tz: &str, start: &str, minutes: u32) -> Window {
        let (h, m) = start.split_once(':').unwrap();
        Window {
            time_zone: tz.into(),
            start_minute: h.parse::<u32>().unwrap() * 60 + m.parse::<u32>().unwrap(),
            duration_minutes: minutes,
        }
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// One row: a window, an instant, whether it is open.
    fn check(w: &Window, at: &str, open: bool) {
        assert_eq!(w.is_open(utc(at)), open, "{w:?} at {at}");
    }

    #[test]
    fn a_window_within_one_day() {
        let w = window("UTC", "02:00", 180);
        check(&w, "2026-06-01T01:59:59Z", false);
        check(&w, "2026-06-01T02:00:00Z", true);
        check(&w, "2026-06-01T04:59:59Z", true);
        check(&w, "2026-06-01T05:00:00Z", false);
    }

    #[test]
    fn a_window_across_midnight_in_the_store_time_zone() {
        // 23:00–01:00 in Paris (UTC+2 in summer).
        let w = window("Europe/Paris", "23:00", 120);
        check(&w, "2026-06-01T20:59:00Z", false);
        check(&w, "2026-06-01T21:00:00Z", true); // 23:00 local
        check(&w, "2026-06-01T22:30:00Z", true); // 00:30 local, next day
        check(&w, "2026-06-01T23:00:00Z", false); // 01:00 local
    }

    #[test]
    fn spring_forward_skips_the_missing_hour() {
        // Paris, 2026-03-29: 02:00 local jumps to 03:00 (01:00Z).
        // A 02:30–03:30 window that night runs from 03:00 to 03:30 local.
        let w = window("Europe/Paris", "02:30", 60);
        check(&w, "2026-03-29T00:59:00Z", false); // 01:59 local
        check(&w, "2026-03-29T01:00:00Z", true); // 03:00 local
        check(&w, "2026-03-29T01:29:00Z", true); // 03:29 local
        check(&w, "2026-03-29T01:30:00Z", false); // 03:30 local
        // The night before, it is a full hour (UTC+1): 01:30Z–02:30Z.
        check(&w, "2026-03-28T01:45:00Z", true);
    }

    #[test]
    fn fall_back_runs_by_the_wall_clock() {
        // Paris, 2026-10-25: 03:00 local (CEST) goes back to 02:00 (CET).
        // A 01:00–04:00 window that night lasts 4 real hours:
        // 01:00 CEST = 23:00Z the day before, 04:00 CET = 03:00Z.
        let w = window("Europe/Paris", "01:00", 180);
        check(&w, "2026-10-24T22:59:00Z", false);
        check(&w, "2026-10-24T23:00:00Z", true);
        check(&w, "2026-10-25T02:30:00Z", true);
        check(&w, "2026-10-25T03:00:00Z", false);
    }

    #[test]
    fn a_whole_day_window_is_always_open() {
        let w = window("America/New_York", "00:00", 1440);
        for at in [
            "2026-03-08T07:30:00Z",
            "2026-11-01T05:30:00Z",
            "2026-06-01T12:00:00Z",
        ] {
            check(&w, at, true);
        }
    }

    #[test]
    fn invalid_windows_are_refused_and_never_open() {
        assert_eq!(
            window("Mars/Olympus", "02:00", 60).validate(),
            Err(WindowError::TimeZone("Mars/Olympus".into()))
        );
        assert_eq!(
            Window {
                time_zone: "UTC".into(),
                start_minute: 1440,
                duration_minutes: 10
            }
            .validate(),
            Err(WindowError::Start(1440))
        );
        let zero = window("UTC", "02:00", 0);
        assert_eq!(zero.validate(), Err(WindowError::Duration(0)));
        check(&zero, "2026-06-01T02:00:00Z", false);
    }

    #[test]
    fn next_open_is_the_coming_start() {
        let w = window("Europe/Paris", "02:00", 60);
        // 10:00 local → tomorrow 02:00 local (00:00Z in summer).
        assert_eq!(
            w.next_open(utc("2026-06-01T08:00:00Z")),
            Some(utc("2026-06-02T00:00:00Z"))
        );
        let inside = utc("2026-06-02T00:30:00Z");
        assert_eq!(w.next_open(inside), Some(inside));
        assert_eq!(clock(w.start_minute), "02:00");
    }
}

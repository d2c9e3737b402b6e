//! Maintenance windows: a daily span of a store's local wall-clock time in
//! which installs may happen. The control plane counts a rollout's timeout
//! in window time and the agent waits for the window to install, so both
//! read windows here: pure functions of instants, pinned by one table test
//! across midnight and daylight-saving changes.

use chrono::{DateTime, Days, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

pub use crate::error::WindowError;

/// Minutes in a local day: a window starts before this minute and lasts at
/// most this long.
pub const MINUTES_PER_DAY: u32 = 24 * 60;

/// A window's time zone: an IANA name such as `Europe/Paris`.
pub fn check_time_zone(time_zone: &str) -> Result<Tz, WindowError> {
    time_zone
        .parse()
        .map_err(|_| WindowError::TimeZone(time_zone.to_string()))
}

/// A window's start, in minutes after local midnight: 0 to 1439.
pub fn check_start_minute(start_minute: i64) -> Result<u32, WindowError> {
    u32::try_from(start_minute)
        .ok()
        .filter(|m| *m < MINUTES_PER_DAY)
        .ok_or(WindowError::Start(start_minute))
}

/// A window's length in minutes: 1 to 1440 (a whole day).
pub fn check_duration_minutes(duration_minutes: i64) -> Result<u32, WindowError> {
    u32::try_from(duration_minutes)
        .ok()
        .filter(|m| (1..=MINUTES_PER_DAY).contains(m))
        .ok_or(WindowError::Duration(duration_minutes))
}

/// A daily window as it is configured, sent to tills and kept on disk: a
/// time zone name and minutes, checked when it is read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    pub time_zone: String,
    pub start_minute: u32,
    pub duration_minutes: u32,
}

impl Window {
    /// The window, if its time zone is known and its minutes are in range.
    pub fn check(&self) -> Result<LocalWindow, WindowError> {
        LocalWindow::new(
            &self.time_zone,
            self.start_minute.into(),
            self.duration_minutes.into(),
        )
    }

    /// Whether `now` falls inside the window. An invalid window is never
    /// open (the control plane validates windows; this is defence).
    pub fn is_open(&self, now: DateTime<Utc>) -> bool {
        self.check().is_ok_and(|w| w.is_open(now))
    }

    /// The next instant at or after `now` at which the window is open;
    /// `None` for an invalid window.
    pub fn next_open(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.check().ok()?.next_open(now)
    }
}

/// A checked daily window: from `start_minute` after local midnight, for
/// `duration_minutes` of local wall-clock time. Only [`LocalWindow::new`]
/// (or [`Window::check`]) builds one, so its minutes are in range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalWindow {
    time_zone: Tz,
    start_minute: u32,
    duration_minutes: u32,
}

/// The instant a local wall-clock time stands for. A time skipped by a DST
/// change (02:30 on a spring-forward night) moves to the first local time
/// that exists after it; a time that occurs twice takes the first.
fn resolve(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    let mut probe = local;
    // A DST gap is at most a few hours; probing minute by minute ends well
    // within a day.
    for _ in 0..MINUTES_PER_DAY {
        match tz.from_local_datetime(&probe) {
            LocalResult::Single(t) => return t.with_timezone(&Utc),
            LocalResult::Ambiguous(first, _) => return first.with_timezone(&Utc),
            LocalResult::None => probe += Duration::minutes(1),
        }
    }
    // Unreachable for any real time zone; treat the time as UTC.
    local.and_utc()
}

impl LocalWindow {
    /// Checks a window's time zone and minutes (stored as integers of any
    /// width, hence `i64`).
    pub fn new(
        time_zone: &str,
        start_minute: i64,
        duration_minutes: i64,
    ) -> Result<LocalWindow, WindowError> {
        Ok(LocalWindow {
            time_zone: check_time_zone(time_zone)?,
            start_minute: check_start_minute(start_minute)?,
            duration_minutes: check_duration_minutes(duration_minutes)?,
        })
    }

    pub fn time_zone(&self) -> Tz {
        self.time_zone
    }

    pub fn start_minute(&self) -> u32 {
        self.start_minute
    }

    pub fn duration_minutes(&self) -> u32 {
        self.duration_minutes
    }

    /// The window that opens on local date `day`, as UTC instants.
    fn opening(&self, day: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
        let start =
            day.and_time(chrono::NaiveTime::MIN) + Duration::minutes(i64::from(self.start_minute));
        let end = start + Duration::minutes(i64::from(self.duration_minutes));
        (resolve(self.time_zone, start), resolve(self.time_zone, end))
    }

    /// The openings whose local start day is `first - 1` to `last`: a
    /// window lasts at most a day, so the one that opened the day before
    /// `first` may still be open on it.
    fn openings(
        &self,
        first: NaiveDate,
        last: NaiveDate,
    ) -> impl Iterator<Item = (DateTime<Utc>, DateTime<Utc>)> + '_ {
        let from = first.pred_opt().unwrap_or(first);
        from.iter_days()
            .take_while(move |day| *day <= last)
            .map(|day| self.opening(day))
    }

    fn local_day(&self, at: DateTime<Utc>) -> NaiveDate {
        at.with_timezone(&self.time_zone).date_naive()
    }

    /// Whether `now` falls inside the window.
    pub fn is_open(&self, now: DateTime<Utc>) -> bool {
        let today = self.local_day(now);
        self.openings(today, today)
            .any(|(start, end)| start <= now && now < end)
    }

    /// The next instant at or after `now` at which the window is open.
    pub fn next_open(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.is_open(now) {
            return Some(now);
        }
        let today = self.local_day(now);
        let last = today.checked_add_days(Days::new(2))?;
        self.openings(today, last)
            .filter(|(start, end)| *start >= now && start < end)
            .map(|(start, _)| start)
            .min()
    }

    /// How much of `[from, to)` lies inside the window; zero when `to` is
    /// not after `from`.
    pub fn open_between(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Duration {
        if to <= from {
            return Duration::zero();
        }
        self.openings(self.local_day(from), self.local_day(to))
            .map(|(start, end)| (start.max(from), end.min(to)))
            .filter(|(open, close)| close > open)
            .map(|(open, close)| close - open)
            .sum()
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

    /// What a row expects of a window at an instant (or over a stretch).
    enum Expect {
        /// Open or closed at the row's instant.
        Open(bool),
        /// The next opening at or after the row's instant.
        NextOpen(Option<&'static str>),
        /// Minutes of window time from the row's instant to this one.
        OpenUntil(&'static str, i64),
    }
    use Expect::*;

    /// The window rules, once for both programs: a window, an instant, what
    /// is expected there.
    #[test]
    fn window_rules() {
        let utc_2_5 = window("UTC", "02:00", 180);
        // 23:00–01:00 in Paris (UTC+2 in summer: 21:00Z–23:00Z).
        let paris_night = window("Europe/Paris", "23:00", 120);
        // Paris, 2026-03-29: 02:00 local jumps to 03:00 (01:00Z). A
        // 02:30–03:30 window that night runs from 03:00 to 03:30 local.
        let spring = window("Europe/Paris", "02:30", 60);
        // Paris, 2026-10-25: 03:00 local (CEST) goes back to 02:00 (CET).
        // A 01:00–04:00 window that night lasts 4 real hours: 01:00 CEST =
        // 23:00Z the day before, 04:00 CET = 03:00Z.
        let fall = window("Europe/Paris", "01:00", 180);
        let whole_day = window("America/New_York", "00:00", 1440);
        // 02:00–04:00 Paris is 00:00–02:00 UTC in summer.
        let paris_2_4 = window("Europe/Paris", "02:00", 120);
        let paris_2_3 = window("Europe/Paris", "02:00", 60);
        let bad_zone = window("Mars/Olympus", "02:00", 60);
        let empty = window("UTC", "02:00", 0);
        let rows: &[(&Window, &str, Expect)] = &[
            (&utc_2_5, "2026-06-01T01:59:59Z", Open(false)),
            (&utc_2_5, "2026-06-01T02:00:00Z", Open(true)),
            (&utc_2_5, "2026-06-01T04:59:59Z", Open(true)),
            (&utc_2_5, "2026-06-01T05:00:00Z", Open(false)),
            (&paris_night, "2026-06-01T20:59:00Z", Open(false)),
            (&paris_night, "2026-06-01T21:00:00Z", Open(true)),
            (&paris_night, "2026-06-01T22:30:00Z", Open(true)),
            (&paris_night, "2026-06-01T23:00:00Z", Open(false)),
            (&spring, "2026-03-29T00:59:00Z", Open(false)),
            (&spring, "2026-03-29T01:00:00Z", Open(true)),
            (&spring, "2026-03-29T01:29:00Z", Open(true)),
            (&spring, "2026-03-29T01:30:00Z", Open(false)),
            // The night before, it is a full hour (UTC+1): 01:30Z–02:30Z.
            (&spring, "2026-03-28T01:45:00Z", Open(true)),
            (&fall, "2026-10-24T22:59:00Z", Open(false)),
            (&fall, "2026-10-24T23:00:00Z", Open(true)),
            (&fall, "2026-10-25T02:30:00Z", Open(true)),
            (&fall, "2026-10-25T03:00:00Z", Open(false)),
            (&whole_day, "2026-03-08T07:30:00Z", Open(true)),
            (&whole_day, "2026-11-01T05:30:00Z", Open(true)),
            (&whole_day, "2026-06-01T12:00:00Z", Open(true)),
            // 10:00 local → tomorrow 02:00 local (00:00Z in summer).
            (
                &paris_2_3,
                "2026-06-01T08:00:00Z",
                NextOpen(Some("2026-06-02T00:00:00Z")),
            ),
            (
                &paris_2_3,
                "2026-06-02T00:30:00Z",
                NextOpen(Some("2026-06-02T00:30:00Z")),
            ),
            (
                &spring,
                "2026-03-28T12:00:00Z",
                NextOpen(Some("2026-03-29T01:00:00Z")),
            ),
            // Window time over a stretch (the control plane's timeouts).
            (
                &paris_2_4,
                "2026-06-01T12:00:00Z",
                OpenUntil("2026-06-01T23:59:00Z", 0),
            ),
            (
                &paris_2_4,
                "2026-06-01T12:00:00Z",
                OpenUntil("2026-06-02T01:00:00Z", 60),
            ),
            (
                &paris_2_4,
                "2026-06-01T12:00:00Z",
                OpenUntil("2026-06-03T12:00:00Z", 240),
            ),
            // From inside the window: from then on.
            (
                &paris_2_4,
                "2026-06-01T01:30:00Z",
                OpenUntil("2026-06-01T03:00:00Z", 30),
            ),
            (
                &paris_night,
                "2026-06-01T22:00:00Z",
                OpenUntil("2026-06-02T22:00:00Z", 120),
            ),
            // 01:30–03:30 local on the spring-forward night holds one real hour.
            (
                &window("Europe/Paris", "01:30", 120),
                "2026-03-28T12:00:00Z",
                OpenUntil("2026-03-29T12:00:00Z", 60),
            ),
            (
                &paris_2_4,
                "2026-06-02T12:00:00Z",
                OpenUntil("2026-06-01T12:00:00Z", 0),
            ),
            // Invalid windows are never open.
            (&bad_zone, "2026-06-01T02:30:00Z", Open(false)),
            (&bad_zone, "2026-06-01T00:00:00Z", NextOpen(None)),
            (&empty, "2026-06-01T02:00:00Z", Open(false)),
            (&empty, "2026-06-01T00:00:00Z", NextOpen(None)),
        ];
        for (w, at, expect) in rows {
            let now = utc(at);
            match expect {
                Open(open) => assert_eq!(w.is_open(now), *open, "{w:?} open at {at}"),
                NextOpen(next) => assert_eq!(
                    w.next_open(now),
                    next.map(utc),
                    "{w:?} next open after {at}"
                ),
                OpenUntil(to, minutes) => assert_eq!(
                    w.check().unwrap().open_between(now, utc(to)),
                    Duration::minutes(*minutes),
                    "{w:?} from {at} to {to}"
                ),
            }
        }
    }

    #[test]
    fn out_of_range_windows_are_refused_naming_the_field() {
        for (tz, start, minutes, error) in [
            (
                "Mars/Olympus",
                0,
                60,
                WindowError::TimeZone("Mars/Olympus".into()),
            ),
            ("UTC", 1440, 60, WindowError::Start(1440)),
            ("UTC", -1, 60, WindowError::Start(-1)),
            ("UTC", 0, 0, WindowError::Duration(0)),
            ("UTC", 0, 1441, WindowError::Duration(1441)),
            ("UTC", 0, i64::MAX, WindowError::Duration(i64::MAX)),
        ] {
            assert_eq!(LocalWindow::new(tz, start, minutes), Err(error));
        }
        assert_eq!(WindowError::Start(1440).field(), "start_minute");
        let edge = LocalWindow::new("UTC", 1439, 1440).unwrap();
        assert_eq!((edge.start_minute(), edge.duration_minutes()), (1439, 1440));
        assert_eq!(clock(edge.start_minute()), "23:59");
    }
}

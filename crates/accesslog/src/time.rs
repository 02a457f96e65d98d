//! Timestamps from `$time_local`, `$time_iso8601` and `$msec`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time as nginx logged it: seconds since the Unix epoch (UTC),
/// sub-second nanoseconds (only `$msec` has them) and the UTC offset the
/// time was written in.
///
/// Ordering compares the instant first, so timestamps written in different
/// offsets compare correctly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    unix: i64,
    nanos: u32,
    offset_minutes: i16,
}

impl Timestamp {
    /// Seconds since 1970-01-01T00:00:00Z.
    pub fn unix_seconds(&self) -> i64 {
        self.unix
    }

    /// Nanoseconds past [`unix_seconds`](Self::unix_seconds).
    pub fn subsec_nanos(&self) -> u32 {
        self.nanos
    }

    /// The UTC offset of the written time, in minutes (`-0700` → -420).
    pub fn utc_offset_minutes(&self) -> i16 {
        self.offset_minutes
    }

    /// The same instant as a [`SystemTime`].
    pub fn to_system_time(&self) -> SystemTime {
        let sub = Duration::from_nanos(u64::from(self.nanos));
        if self.unix >= 0 {
            UNIX_EPOCH + Duration::from_secs(self.unix.unsigned_abs()) + sub
        } else {
            UNIX_EPOCH - Duration::from_secs(self.unix.unsigned_abs()) + sub
        }
    }

    /// `10/Oct/2000:13:55:36 -0700`.
    pub(crate) fn parse_time_local(v: &str) -> Option<Self> {
        let b = v.as_bytes();
        if b.len() != 26
            || b[2] != b'/'
            || b[6] != b'/'
            || b[11] != b':'
            || b[14] != b':'
            || b[17] != b':'
            || b[20] != b' '
        {
            return None;
        }
        let day = digits(&b[0..2])?;
        let month = month(&b[3..6])?;
        let year = digits(&b[7..11])?;
        let (h, m, s) = (
            digits(&b[12..14])?,
            digits(&b[15..17])?,
            digits(&b[18..20])?,
        );
        let sign = sign(b[21])?;
        let offset = sign * (digits(&b[22..24])? * 60 + digits(&b[24..26])?);
        Self::from_parts(year, month, day, h, m, s, offset)
    }

    /// `2000-10-10T13:55:36-07:00` (also `Z` for UTC).
    pub(crate) fn parse_iso8601(v: &str) -> Option<Self> {
        let b = v.as_bytes();
        if b.len() < 20
            || b[4] != b'-'
            || b[7] != b'-'
            || b[10] != b'T'
            || b[13] != b':'
            || b[16] != b':'
        {
            return None;
        }
        let year = digits(&b[0..4])?;
        let month = digits(&b[5..7])?;
        let day = digits(&b[8..10])?;
        let (h, m, s) = (
            digits(&b[11..13])?,
            digits(&b[14..16])?,
            digits(&b[17..19])?,
        );
        let offset = match &b[19..] {
            b"Z" => 0,
            [sg, h1, h2, b':', m1, m2] => {
                sign(*sg)? * (digits(&[*h1, *h2])? * 60 + digits(&[*m1, *m2])?)
            }
            _ => return None,
        };
        Self::from_parts(year, month, day, h, m, s, offset)
    }

    /// `1700000000.123` (seconds with millisecond resolution, UTC).
    pub(crate) fn parse_msec(v: &str) -> Option<Self> {
        let d = crate::record::parse_seconds(v)?;
        Some(Self {
            unix: i64::try_from(d.as_secs()).ok()?,
            nanos: d.subsec_nanos(),
            offset_minutes: 0,
        })
    }

    fn from_parts(
        year: i64,
        month: i64,
        day: i64,
        h: i64,
        m: i64,
        s: i64,
        offset_minutes: i64,
    ) -> Option<Self> {
        if !(1..=12).contains(&month)
            || day < 1
            || day > days_in_month(year, month)
            || h > 23
            || m > 59
            || s > 60
            || offset_minutes.abs() > 24 * 60
        {
            return None;
        }
        let days = days_from_civil(year, month, day);
        let local = days * 86_400 + h * 3600 + m * 60 + s;
        Some(Self {
            unix: local - offset_minutes * 60,
            nanos: 0,
            offset_minutes: i16::try_from(offset_minutes).ok()?,
        })
    }
}

fn digits(b: &[u8]) -> Option<i64> {
    let mut n = 0i64;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(c - b'0');
    }
    Some(n)
}

fn sign(c: u8) -> Option<i64> {
    match c {
        b'+' => Some(1),
        b'-' => Some(-1),
        _ => None,
    }
}

fn month(b: &[u8]) -> Option<i64> {
    const NAMES: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    NAMES
        .iter()
        .position(|n| n.as_slice() == b)
        .map(|i| i as i64 + 1)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_local_and_iso_agree() {
        let a = Timestamp::parse_time_local("10/Oct/2000:13:55:36 -0700").unwrap();
        let b = Timestamp::parse_iso8601("2000-10-10T13:55:36-07:00").unwrap();
        let c = Timestamp::parse_iso8601("2000-10-10T20:55:36Z").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.unix_seconds(), 971_211_336);
        assert_eq!(a.unix_seconds(), c.unix_seconds());
        assert_eq!(a.utc_offset_minutes(), -420);
        assert_eq!(
            a.to_system_time(),
            UNIX_EPOCH + Duration::from_secs(971_211_336)
        );
    }

    #[test]
    fn rejects_bad_dates() {
        assert!(Timestamp::parse_time_local("31/Feb/2000:13:55:36 -0700").is_none());
        assert!(Timestamp::parse_time_local("29/Feb/2000:13:55:36 +0000").is_some());
        assert!(Timestamp::parse_time_local("29/Feb/1900:13:55:36 +0000").is_none());
        assert!(Timestamp::parse_time_local("10/Foo/2000:13:55:36 -0700").is_none());
        assert!(Timestamp::parse_iso8601("2000-10-10T25:55:36Z").is_none());
        assert!(Timestamp::parse_iso8601("2000-10-10T13:55:36+0700").is_none());
    }

    #[test]
    fn msec() {
        let t = Timestamp::parse_msec("1700000000.123").unwrap();
        assert_eq!(t.unix_seconds(), 1_700_000_000);
        assert_eq!(t.subsec_nanos(), 123_000_000);
        assert!(
            Timestamp::parse_iso8601("1969-12-31T23:59:59Z")
                .unwrap()
                .unix_seconds()
                == -1
        );
    }
}

//! Timestamps in answers, written exactly as chrono's `Serialize` writes them (RFC 3339 in UTC:
//! `Z`, and a fraction of 0, 3, 6 or 9 digits, the fewest that hold the value) but into a
//! small buffer rather than through `core::fmt` one character at a time: a profile has four,
//! and chrono's way cost about a tenth of a `GET /v1/me`'s instructions.
//!
//! Fields use it with `#[serde(serialize_with = "timestamps::utc")]` (or
//! `timestamps::optional_utc`); a year outside 0–9999 is left to chrono.

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::{Serialize, Serializer};

/// `2026-11-28T07:14:05.794308Z`: at most 30 bytes.
fn write(at: &DateTime<Utc>, buf: &mut [u8; 30]) -> Option<usize> {
    let year = at.year();
    if !(0..=9999).contains(&year) {
        return None;
    }
    let two = |buf: &mut [u8; 30], at: usize, n: u32| {
        buf[at] = b'0' + (n / 10) as u8;
        buf[at + 1] = b'0' + (n % 10) as u8;
    };
    let year = year as u32;
    two(buf, 0, year / 100);
    two(buf, 2, year % 100);
    buf[4] = b'-';
    two(buf, 5, at.month());
    buf[7] = b'-';
    two(buf, 8, at.day());
    buf[10] = b'T';
    let (mut second, mut nanos) = (at.second(), at.nanosecond());
    // A leap second is carried in the nanoseconds.
    if nanos >= 1_000_000_000 {
        second += 1;
        nanos -= 1_000_000_000;
    }
    two(buf, 11, at.hour());
    buf[13] = b':';
    two(buf, 14, at.minute());
    buf[16] = b':';
    two(buf, 17, second);
    let mut len = 19;
    let (mut fraction, digits) = if nanos == 0 {
        (0, 0)
    } else if nanos % 1_000_000 == 0 {
        (nanos / 1_000_000, 3)
    } else if nanos % 1_000 == 0 {
        (nanos / 1_000, 6)
    } else {
        (nanos, 9)
    };
    if digits > 0 {
        buf[len] = b'.';
        for i in (0..digits).rev() {
            buf[len + 1 + i] = b'0' + (fraction % 10) as u8;
            fraction /= 10;
        }
        len += 1 + digits;
    }
    buf[len] = b'Z';
    Some(len + 1)
}

pub fn utc<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; 30];
    match write(at, &mut buf) {
        // Only ASCII digits and separators were written.
        Some(len) => serializer.serialize_str(std::str::from_utf8(&buf[..len]).unwrap_or_default()),
        None => at.serialize(serializer),
    }
}

pub fn optional_utc<S: Serializer>(
    at: &Option<DateTime<Utc>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => utc(at, serializer),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn ours(at: &DateTime<Utc>) -> String {
        utc(at, serde_json::value::Serializer)
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn written_as_chrono_writes_them() {
        let mut seconds: i64 = 0;
        let mut cases = vec![
            Utc.timestamp_opt(0, 0).unwrap(),
            Utc.timestamp_opt(1_795_000_000, 794_308_000).unwrap(),
            Utc.timestamp_opt(1_795_000_000, 120_000_000).unwrap(),
            Utc.timestamp_opt(1_795_000_000, 1).unwrap(),
            Utc.timestamp_opt(1_795_000_000, 999_999_999).unwrap(),
            // A leap second.
            Utc.timestamp_opt(1_483_228_799, 1_500_000_000).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(33, 2, 3, 4, 5, 6).unwrap(),
        ];
        for i in 0..20_000u32 {
            // Spread over the years 0 to 9999 and every kind of fraction.
            seconds = seconds
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let secs = (seconds >> 1).rem_euclid(253_402_300_799) - 62_167_219_200;
            let nanos = match i % 4 {
                0 => 0,
                1 => (i * 7919 % 1000) * 1_000_000,
                2 => (i * 7919 % 1_000_000) * 1_000,
                _ => i * 7919 % 1_000_000_000,
            };
            cases.push(Utc.timestamp_opt(secs, nanos).unwrap());
        }
        for at in &cases {
            assert_eq!(
                ours(at),
                serde_json::to_value(at).unwrap().as_str().unwrap(),
                "{at:?}"
            );
        }
    }

    #[test]
    fn none_is_null() {
        assert!(
            optional_utc(&None, serde_json::value::Serializer)
                .unwrap()
                .is_null()
        );
    }
}

//! IoTDA wall-clock formats, computed from Unix milliseconds without a time library.
//!
//! IoTDA uses two formats: the compact `yyyyMMdd'T'HHmmss'Z'` for most fields and
//! `yyyy-MM-dd'T'HH:mm:ss.SSS'Z'` for a few device fields. Devices may also send
//! `yyyy-MM-dd'T'HH:mm:ss'Z'` (the Python device SDK does).

/// Broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub millis: u32,
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Civil {
    /// Splits Unix milliseconds into UTC fields.
    pub fn from_unix_ms(ms: i64) -> Civil {
        let days = ms.div_euclid(86_400_000);
        let rest = ms.rem_euclid(86_400_000);
        let (year, month, day) = civil_from_days(days);
        let secs = rest / 1000;
        Civil {
            year,
            month,
            day,
            hour: (secs / 3600) as u32,
            minute: (secs / 60 % 60) as u32,
            second: (secs % 60) as u32,
            millis: (rest % 1000) as u32,
        }
    }

    /// Unix milliseconds, or `None` when a field is out of range.
    pub fn to_unix_ms(self) -> Option<i64> {
        let valid = (1..=12).contains(&self.month)
            && (1..=31).contains(&self.day)
            && self.hour < 24
            && self.minute < 60
            && self.second < 61
            && self.millis < 1000;
        if !valid {
            return None;
        }
        let days = days_from_civil(self.year, self.month, self.day);
        // Reject dates such as February 30th that the day arithmetic would silently roll over.
        if civil_from_days(days) != (self.year, self.month, self.day) {
            return None;
        }
        let secs =
            i64::from(self.hour) * 3600 + i64::from(self.minute) * 60 + i64::from(self.second);
        Some(days * 86_400_000 + secs * 1000 + i64::from(self.millis))
    }
}

/// `20151212T121212Z`, the format of most IoTDA time fields.
pub fn format_compact(ms: i64) -> String {
    let c = Civil::from_unix_ms(ms);
    if !(0..=9999).contains(&c.year) {
        return format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            c.year, c.month, c.day, c.hour, c.minute, c.second
        );
    }
    // Written digit by digit: `format!` made the timestamps of a report's push envelope ~3 % of
    // the server's CPU under load (BENCHMARKS.md).
    let mut out = String::with_capacity(16);
    push_date_time(&mut out, &c, "", "");
    out.push('Z');
    out
}

/// `2015-12-12T12:12:12.123Z`, used by `active_time` and `connection_status_update_time`.
pub fn format_iso_millis(ms: i64) -> String {
    let c = Civil::from_unix_ms(ms);
    if !(0..=9999).contains(&c.year) {
        return format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            c.year, c.month, c.day, c.hour, c.minute, c.second, c.millis
        );
    }
    let mut out = String::with_capacity(24);
    push_date_time(&mut out, &c, "-", ":");
    out.push('.');
    push_digits(&mut out, c.millis, 3);
    out.push('Z');
    out
}

/// Appends `YYYY·MM·DDThh:mm:ss` with the given separators (the year within 0..=9999).
fn push_date_time(out: &mut String, c: &Civil, date_separator: &str, time_separator: &str) {
    push_digits(out, c.year as u32, 4);
    for (separator, field) in [(date_separator, c.month), (date_separator, c.day)] {
        out.push_str(separator);
        push_digits(out, field, 2);
    }
    out.push('T');
    push_digits(out, c.hour, 2);
    for (separator, field) in [(time_separator, c.minute), (time_separator, c.second)] {
        out.push_str(separator);
        push_digits(out, field, 2);
    }
}

/// Appends the last `width` decimal digits of `value`, zero-padded (`width` at most 4).
fn push_digits(out: &mut String, value: u32, width: usize) {
    let mut digits = [b'0'; 4];
    let mut rest = value;
    for slot in digits[..width].iter_mut().rev() {
        *slot = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    out.extend(digits[..width].iter().map(|&d| char::from(d)));
}

/// `YYYYMMDDHH`, the hour stamp inside an MQTT client id and the HMAC key of the device password.
pub fn format_hour_stamp(ms: i64) -> String {
    let c = Civil::from_unix_ms(ms);
    format!("{:04}{:02}{:02}{:02}", c.year, c.month, c.day, c.hour)
}

fn digits(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses `YYYYMMDDHH` into the Unix milliseconds of that hour.
pub fn parse_hour_stamp(s: &str) -> Option<i64> {
    if s.len() != 10 {
        return None;
    }
    Civil {
        year: i64::from(digits(s.get(0..4)?)?),
        month: digits(s.get(4..6)?)?,
        day: digits(s.get(6..8)?)?,
        hour: digits(s.get(8..10)?)?,
        minute: 0,
        second: 0,
        millis: 0,
    }
    .to_unix_ms()
}

/// Parses a device-supplied `event_time` in any of the formats IoTDA accepts:
/// `20151212T121212Z`, `2020-08-12T12:12:12.333Z` and `2020-08-12T12:12:12Z`.
pub fn parse_event_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if s.len() == 16 && b[8] == b'T' && b[15] == b'Z' {
        return Civil {
            year: i64::from(digits(s.get(0..4)?)?),
            month: digits(s.get(4..6)?)?,
            day: digits(s.get(6..8)?)?,
            hour: digits(s.get(9..11)?)?,
            minute: digits(s.get(11..13)?)?,
            second: digits(s.get(13..15)?)?,
            millis: 0,
        }
        .to_unix_ms();
    }
    let iso_shape = s.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && s.ends_with('Z');
    if !iso_shape {
        return None;
    }
    let millis = match s.len() {
        20 => 0,
        24 if b[19] == b'.' => digits(s.get(20..23)?)?,
        _ => return None,
    };
    Civil {
        year: i64::from(digits(s.get(0..4)?)?),
        month: digits(s.get(5..7)?)?,
        day: digits(s.get(8..10)?)?,
        hour: digits(s.get(11..13)?)?,
        minute: digits(s.get(14..16)?)?,
        second: digits(s.get(17..19)?)?,
        millis,
    }
    .to_unix_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        // 2025-04-14T01:02:03.456Z
        let ms = 1_744_592_523_456;
        assert_eq!(format_compact(ms), "20250414T010203Z");
        assert_eq!(format_iso_millis(ms), "2025-04-14T01:02:03.456Z");
        assert_eq!(format_hour_stamp(ms), "2025041401");
        assert_eq!(format_compact(0), "19700101T000000Z");
        assert_eq!(format_compact(951_782_400_000), "20000229T000000Z");
    }

    #[test]
    fn digit_by_digit_formats_match_the_padded_formatter() {
        let instants = [
            i64::MIN / 4,
            -62_167_219_200_001, // just before year 0
            -62_167_219_200_000,
            -1,
            0,
            951_782_399_999,
            951_782_400_000,
            1_744_592_523_456,
            4_102_444_799_999,
            253_402_300_799_999, // 9999-12-31T23:59:59.999
            253_402_300_800_000, // year 10000
            i64::MAX / 4,
        ];
        for ms in instants {
            let c = Civil::from_unix_ms(ms);
            let compact = format!(
                "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
                c.year, c.month, c.day, c.hour, c.minute, c.second
            );
            let iso = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                c.year, c.month, c.day, c.hour, c.minute, c.second, c.millis
            );
            assert_eq!(format_compact(ms), compact, "{ms}");
            assert_eq!(format_iso_millis(ms), iso, "{ms}");
        }
    }

    #[test]
    fn parses_every_accepted_event_time_format() {
        let cases: &[(&str, Option<i64>)] = &[
            ("20250414T010203Z", Some(1_744_592_523_000)),
            ("2025-04-14T01:02:03.456Z", Some(1_744_592_523_456)),
            ("2025-04-14T01:02:03Z", Some(1_744_592_523_000)),
            ("20250230T010203Z", None),
            ("2025-13-14T01:02:03Z", None),
            ("2025-04-14 01:02:03", None),
            ("yesterday", None),
            ("", None),
            ("2025041401", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_event_time(input), *want, "{input}");
        }
    }

    #[test]
    fn hour_stamp_round_trips() {
        let ms = parse_hour_stamp("2025041401");
        assert_eq!(ms, Some(1_744_592_400_000));
        assert_eq!(parse_hour_stamp("2025041424"), None);
        assert_eq!(parse_hour_stamp("20250414xx"), None);
        assert_eq!(format_hour_stamp(1_744_592_400_000), "2025041401");
    }
}

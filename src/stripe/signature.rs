//! Stripe's webhook signature scheme: `Stripe-Signature: t=<unix time>,v1=<hex>[,v1=<hex>…]`,
//! where each `v1` is HMAC-SHA256 over `"<t>.<raw body>"` keyed with a `whsec_…` secret.
//! Checked on the raw bytes before anything is parsed.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::config::Secret;

/// Largest accepted distance between the signature's timestamp and now, both ways.
pub const TOLERANCE_SECONDS: i64 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    Missing,
    Malformed,
    OutsideTolerance,
    NoMatch,
}

/// Checks `header` against `payload` with any of `secrets`; any of the header's `v1` values may
/// match (Stripe sends one per active secret while a secret is being rolled).
pub fn verify(
    header: Option<&str>,
    payload: &[u8],
    secrets: &[Secret],
    now: i64,
) -> Result<i64, SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        let Some((key, value)) = part.trim().split_once('=') else {
            continue;
        };
        match key {
            "t" => {
                if timestamp.is_some() {
                    return Err(SignatureError::Malformed);
                }
                timestamp = Some(
                    value
                        .parse::<i64>()
                        .map_err(|_| SignatureError::Malformed)?,
                );
            }
            "v1" => {
                if let Some(bytes) = decode_hex(value) {
                    signatures.push(bytes);
                }
            }
            // Other schemes (v0 is Stripe's test-only scheme) are never trusted.
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if !within_tolerance(timestamp, now) {
        return Err(SignatureError::OutsideTolerance);
    }
    for secret in secrets {
        let mac = signed_payload_mac(secret.expose(), timestamp, payload);
        // verify_slice compares in constant time.
        if signatures
            .iter()
            .any(|sig| mac.clone().verify_slice(sig).is_ok())
        {
            return Ok(timestamp);
        }
    }
    Err(SignatureError::NoMatch)
}

/// Whether `timestamp` is at most [`TOLERANCE_SECONDS`] away from `now`. The header is the
/// sender's to choose, so any `i64` can arrive here: the distance is taken in `i128`, where
/// the difference of two `i64` always fits, instead of overflowing near `i64::MIN`/`MAX`.
fn within_tolerance(timestamp: i64, now: i64) -> bool {
    (i128::from(now) - i128::from(timestamp)).abs() <= i128::from(TOLERANCE_SECONDS)
}

/// The `v1` signature Stripe would send for `payload` at `timestamp` (used by tests and tools).
pub fn sign(secret: &str, timestamp: i64, payload: &[u8]) -> String {
    let bytes = signed_payload_mac(secret, timestamp, payload)
        .finalize()
        .into_bytes();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn signed_payload_mac(secret: &str, timestamp: i64, payload: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = br#"{"id":"evt_test_webhook","object":"event"}"#;

    #[test]
    fn the_signer_matches_stripes_documented_vector() {
        assert_eq!(
            sign("whsec_test_secret", 12345, BODY),
            "e7df43adcf699b3839cf5fe20429cae4712141aee3660a1671b34f77a1be9444"
        );
    }

    #[test]
    fn the_matrix() {
        let secret = [Secret::new("whsec_test_secret")];
        let now = 1_700_000_000;
        let good = sign("whsec_test_secret", now, BODY);
        let header = format!("t={now},v1={good}");
        assert_eq!(verify(Some(&header), BODY, &secret, now), Ok(now));

        let mut tampered = BODY.to_vec();
        tampered[10] ^= 1;
        assert_eq!(
            verify(Some(&header), &tampered, &secret, now),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            verify(Some(&header), BODY, &[Secret::new("whsec_other")], now),
            Err(SignatureError::NoMatch)
        );

        let old = format!(
            "t={},v1={}",
            now - 301,
            sign("whsec_test_secret", now - 301, BODY)
        );
        assert_eq!(
            verify(Some(&old), BODY, &secret, now),
            Err(SignatureError::OutsideTolerance)
        );
        let future = format!(
            "t={},v1={}",
            now + 301,
            sign("whsec_test_secret", now + 301, BODY)
        );
        assert_eq!(
            verify(Some(&future), BODY, &secret, now),
            Err(SignatureError::OutsideTolerance)
        );
        let edge = format!(
            "t={},v1={}",
            now - 300,
            sign("whsec_test_secret", now - 300, BODY)
        );
        assert!(verify(Some(&edge), BODY, &secret, now).is_ok());

        assert_eq!(
            verify(None, BODY, &secret, now),
            Err(SignatureError::Missing)
        );
        for bad in [
            "",
            "garbage",
            "t=abc,v1=00",
            &format!("v1={good}"),
            &format!("t={now}"),
            &format!("t={now},t={now},v1={good}"),
        ] {
            assert_eq!(
                verify(Some(bad), BODY, &secret, now),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }

        let two = format!("t={now},v1={},v1={good}", "ab".repeat(32));
        assert!(verify(Some(&two), BODY, &secret, now).is_ok());
        let v0_only = format!("t={now},v0={good}");
        assert_eq!(
            verify(Some(&v0_only), BODY, &secret, now),
            Err(SignatureError::Malformed)
        );

        let rotating = [Secret::new("whsec_new"), Secret::new("whsec_test_secret")];
        assert!(verify(Some(&header), BODY, &rotating, now).is_ok());
    }

    #[test]
    fn timestamps_at_the_ends_of_i64_are_outside_the_tolerance_not_a_panic() {
        let secret = [Secret::new("whsec_test_secret")];
        for now in [0, 1_700_000_000, i64::MIN, i64::MAX] {
            for t in [i64::MIN, i64::MIN + 1, i64::MAX - 1, i64::MAX] {
                if (i128::from(now) - i128::from(t)).abs() <= 300 {
                    continue;
                }
                let header = format!("t={t},v1={}", sign("whsec_test_secret", t, BODY));
                assert_eq!(
                    verify(Some(&header), BODY, &secret, now),
                    Err(SignatureError::OutsideTolerance),
                    "t={t}, now={now}"
                );
            }
        }
    }

    #[test]
    fn the_tolerance_holds_at_the_ends_of_i64_too() {
        let secret = [Secret::new("whsec_test_secret")];
        for (t, now) in [
            (i64::MAX, i64::MAX - 300),
            (i64::MIN, i64::MIN + 300),
            (i64::MAX - 300, i64::MAX),
            (i64::MIN + 300, i64::MIN),
        ] {
            let header = format!("t={t},v1={}", sign("whsec_test_secret", t, BODY));
            assert_eq!(verify(Some(&header), BODY, &secret, now), Ok(t), "t={t}");
        }
        let header = format!(
            "t={},v1={}",
            i64::MIN,
            sign("whsec_test_secret", i64::MIN, BODY)
        );
        assert_eq!(
            verify(Some(&header), BODY, &secret, i64::MIN + 301),
            Err(SignatureError::OutsideTolerance)
        );
    }
}

//! A token in JWS compact form (`header.payload.signature`, each part base64url without
//! padding), taken apart once: the header read for its algorithm and key id, the signature
//! checked over the first two parts as sent, and the payload decoded once both for the claims
//! this service reads and for the text handed to PostgreSQL.
//!
//! HS256 signatures are checked here, with the project secret's HMAC keyed once at start-up;
//! asymmetric ones go to jsonwebtoken's provider (`es256` for ES256).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use sha2::Sha256;

use super::{LEEWAY_SECONDS, Refusal};

/// The three parts of a compact token, as sent.
pub struct Compact<'a> {
    header: &'a str,
    payload: &'a str,
    /// `header.payload`: what the signature covers.
    signing_input: &'a str,
    signature: &'a str,
}

impl<'a> Compact<'a> {
    /// Exactly three parts separated by dots, or `None`.
    pub fn split(token: &'a str) -> Option<Self> {
        let (signing_input, signature) = token.rsplit_once('.')?;
        let (header, payload) = signing_input.split_once('.')?;
        if payload.contains('.') {
            return None;
        }
        Some(Self {
            header,
            payload,
            signing_input,
            signature,
        })
    }

    /// The protected header; `None` when it is not base64url JSON naming a known algorithm.
    pub fn header(&self) -> Option<Header> {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(self.header).ok()?).ok()
    }

    /// Checks an asymmetric signature with a JWKS key.
    pub fn verify_with(&self, key: &DecodingKey, algorithm: Algorithm) -> Result<(), Refusal> {
        match jsonwebtoken::crypto::verify(
            self.signature,
            self.signing_input.as_bytes(),
            key,
            algorithm,
        ) {
            Ok(true) => Ok(()),
            Ok(false) => Err("bad signature"),
            Err(_) => Err("the token could not be verified"),
        }
    }

    /// The claims, checked for their time bounds at `now` (seconds since the epoch), and the
    /// payload's text exactly as signed. Call only once the signature has been checked.
    pub fn claims(&self, now: u64) -> Result<(Claims, String), Refusal> {
        const UNREADABLE: Refusal = "the token could not be verified";
        let bytes = URL_SAFE_NO_PAD
            .decode(self.payload)
            .map_err(|_| UNREADABLE)?;
        let claims: Claims = serde_json::from_slice(&bytes).map_err(|_| UNREADABLE)?;
        // The same bounds as jsonwebtoken's validation with this leeway: refused once `exp` is
        // more than the leeway in the past, or `nbf` more than the leeway in the future.
        if claims.exp < now.saturating_sub(LEEWAY_SECONDS) {
            return Err("the token has expired");
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(LEEWAY_SECONDS))
        {
            return Err("the token is not valid yet");
        }
        let text = String::from_utf8(bytes).map_err(|_| UNREADABLE)?;
        Ok((claims, text))
    }
}

/// The header fields this service reads; an unknown `alg` (`none` included) is unreadable.
#[derive(serde::Deserialize)]
pub struct Header {
    pub alg: Algorithm,
    pub kid: Option<String>,
}

/// The claims this service reads; the rest travel untouched in the signed payload.
#[derive(serde::Deserialize)]
pub struct Claims {
    pub role: Option<String>,
    pub sub: Option<Value>,
    pub is_anonymous: Option<bool>,
    pub aud: Option<Value>,
    pub iss: Option<String>,
    /// Whole seconds, required: a token without it, or with another form, is refused.
    pub exp: u64,
    pub nbf: Option<u64>,
}

/// The project's HS256 secret, keyed once.
#[derive(Clone)]
pub struct Hs256Key(Hmac<Sha256>);

impl Hs256Key {
    pub fn new(secret: &[u8]) -> Self {
        Self(Hmac::new_from_slice(secret).expect("HMAC takes keys of any length"))
    }

    /// Checks the token's signature, comparing in constant time.
    pub fn verify(&self, token: &Compact<'_>) -> Result<(), Refusal> {
        let signature = URL_SAFE_NO_PAD
            .decode(token.signature)
            .map_err(|_| "the token could not be verified")?;
        let mut mac = self.0.clone();
        mac.update(token.signing_input.as_bytes());
        mac.verify_slice(&signature).map_err(|_| "bad signature")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_has_exactly_three_parts() {
        assert!(Compact::split("a.b.c").is_some());
        assert!(Compact::split("a.b").is_none());
        assert!(Compact::split("a.b.c.d").is_none());
        assert!(Compact::split("abc").is_none());
        let parts = Compact::split("a.b.c").unwrap();
        assert_eq!(parts.signing_input, "a.b");
        assert_eq!(parts.signature, "c");
    }
}

//! ES256 signatures, checked with ring. ring is already built for TLS, and its P-256
//! verification is several times faster than the pure-Rust one jsonwebtoken uses by default;
//! a Supabase project with asymmetric keys signs its users' tokens with ES256, and a token not
//! yet remembered (`cache`) pays for one check. Every other algorithm, and all signing, stays
//! with jsonwebtoken's RustCrypto provider.

use std::sync::{LazyLock, Once};

use jsonwebtoken::crypto::{CryptoProvider, JwtVerifier, rust_crypto};
use jsonwebtoken::errors::{ErrorKind, Result};
use jsonwebtoken::signature::{Error, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

/// A P-256 public key as an uncompressed SEC1 point, which is how jsonwebtoken holds one
/// taken from a JWK; the signature is JWS's 64 bytes, r then s.
struct RingEs256(Vec<u8>);

impl Verifier<Vec<u8>> for RingEs256 {
    fn verify(&self, message: &[u8], signature: &Vec<u8>) -> std::result::Result<(), Error> {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &self.0)
            .verify(message, signature)
            .map_err(|_| Error::new())
    }
}

impl JwtVerifier for RingEs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::ES256
    }
}

fn verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
    if *algorithm == Algorithm::ES256 {
        if key.family() != AlgorithmFamily::Ec {
            return Err(ErrorKind::InvalidKeyFormat.into());
        }
        return Ok(Box::new(RingEs256(key.as_bytes().to_vec())));
    }
    (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(algorithm, key)
}

static PROVIDER: LazyLock<CryptoProvider> = LazyLock::new(|| CryptoProvider {
    verifier_factory: verifier,
    ..rust_crypto::DEFAULT_PROVIDER.clone()
});

/// Makes ring check ES256 signatures for the whole process. Must run before jsonwebtoken
/// first signs or verifies anything, which fixes its provider for good; when something came
/// first, RustCrypto goes on checking them (as correctly, more slowly) and this says so.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if CryptoProvider::install_default(&PROVIDER).is_err() {
            tracing::debug!(
                "jsonwebtoken's provider was already chosen; ES256 stays with RustCrypto"
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    const PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/es256_private.pem");
    const PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/es256_public.pem");
    const OTHER: &[u8] = include_bytes!("../../tests/fixtures/es256_other_private.pem");

    /// A token's signing input and its signature, decoded.
    fn signed(pem: &[u8], claims: &str) -> (String, Vec<u8>) {
        use base64::Engine;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k".to_owned());
        let token = jsonwebtoken::encode(
            &header,
            &serde_json::from_str::<serde_json::Value>(claims).unwrap(),
            &EncodingKey::from_ec_pem(pem).unwrap(),
        )
        .unwrap();
        let (input, signature) = token.rsplit_once('.').unwrap();
        let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(signature)
            .unwrap();
        (input.to_owned(), signature)
    }

    fn both(key: &DecodingKey, input: &str, signature: &[u8]) -> (bool, bool) {
        let ring = verifier(&Algorithm::ES256, key).unwrap();
        let rust_crypto =
            (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(&Algorithm::ES256, key).unwrap();
        let signature = signature.to_vec();
        (
            ring.verify(input.as_bytes(), &signature).is_ok(),
            rust_crypto.verify(input.as_bytes(), &signature).is_ok(),
        )
    }

    #[test]
    fn ring_accepts_and_refuses_exactly_what_rust_crypto_does() {
        let key = DecodingKey::from_ec_pem(PUBLIC).unwrap();
        let (input, signature) = signed(PRIVATE, r#"{"sub": "a", "exp": 1}"#);
        assert_eq!(both(&key, &input, &signature), (true, true));

        // Another key's signature, a changed message, a changed signature, a truncated one.
        let (_, forged) = signed(OTHER, r#"{"sub": "a", "exp": 1}"#);
        assert_eq!(both(&key, &input, &forged), (false, false));
        assert_eq!(both(&key, &format!("{input}x"), &signature), (false, false));
        let mut flipped = signature.clone();
        flipped[10] ^= 1;
        assert_eq!(both(&key, &input, &flipped), (false, false));
        assert_eq!(both(&key, &input, &signature[..63]), (false, false));
    }

    #[test]
    fn a_key_that_is_not_an_ec_key_is_refused_for_es256() {
        let key = DecodingKey::from_secret(b"a secret of at least thirty-two bytes");
        assert!(verifier(&Algorithm::ES256, &key).is_err());
    }
}

//! A local stand-in for Google's AdMob verifier key server, speaking its format
//! (`{"keys": [{"keyId", "pem", "base64"}]}`), with keys generated per test, and callbacks
//! signed the way AdMob signs them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use serde_json::{Value, json};
use uuid::Uuid;

/// The DER header of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1, a BIT STRING
/// of 66 bytes), before the 65-byte uncompressed point.
const P256_SPKI_HEADER: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

pub struct AdmobKey {
    pub id: i64,
    signing: SigningKey,
}

impl AdmobKey {
    /// A fresh key pair (its secret from two random UUIDs' bytes).
    pub fn generate(id: i64) -> Self {
        let mut secret = [0u8; 32];
        secret[..16].copy_from_slice(Uuid::new_v4().as_bytes());
        secret[16..].copy_from_slice(Uuid::new_v4().as_bytes());
        AdmobKey {
            id,
            signing: SigningKey::from_slice(&secret).expect("a valid P-256 secret"),
        }
    }

    /// The key as Google publishes it.
    pub fn entry(&self) -> Value {
        let mut der = P256_SPKI_HEADER.to_vec();
        der.extend_from_slice(
            self.signing
                .verifying_key()
                .to_encoded_point(false)
                .as_bytes(),
        );
        let b64 = STANDARD.encode(&der);
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----");
        json!({"keyId": self.id, "pem": pem, "base64": b64})
    }

    /// URL-safe base64 (no padding) of the DER signature over `message`.
    pub fn sign(&self, message: &str) -> String {
        let signature: Signature = self.signing.sign(message.as_bytes());
        URL_SAFE_NO_PAD.encode(signature.to_der().as_bytes())
    }
}

/// Serves the published keys; they can change (rotation) and their fetches are counted.
pub struct KeyServer {
    pub url: String,
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
}

impl KeyServer {
    pub async fn start(keys: &[&AdmobKey]) -> Self {
        let published: Arc<Mutex<Vec<Value>>> =
            Arc::new(Mutex::new(keys.iter().map(|k| k.entry()).collect()));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (served, counted) = (published.clone(), fetches.clone());
        let app = Router::new().route(
            "/verifier-keys.json",
            get(move || {
                let served = served.clone();
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let keys = served.lock().unwrap().clone();
                    axum::Json(json!({ "keys": keys }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        KeyServer {
            url: format!("http://{address}/verifier-keys.json"),
            keys: published,
            fetches,
        }
    }

    pub fn publish(&self, keys: &[&AdmobKey]) {
        *self.keys.lock().unwrap() = keys.iter().map(|k| k.entry()).collect();
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// Percent-encodes every byte outside the unreserved set; with `everything`, every byte.
pub fn encode(value: &str, everything: bool) -> String {
    value
        .bytes()
        .map(|b| {
            if !everything && (b.is_ascii_alphanumeric() || b"-._~".contains(&b)) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A callback's query string as AdMob sends it: the parameters (name, value as sent, value
/// decoded), then `signature` over the decoded text and `key_id`.
pub fn signed_query(key: &AdmobKey, params: &[(&str, String, String)]) -> String {
    let sent: Vec<String> = params
        .iter()
        .map(|(n, raw, _)| format!("{n}={raw}"))
        .collect();
    let signed: Vec<String> = params
        .iter()
        .map(|(n, _, plain)| format!("{n}={plain}"))
        .collect();
    let signature = key.sign(&signed.join("&"));
    format!("{}&signature={signature}&key_id={}", sent.join("&"), key.id)
}

/// The parameters of a callback for `user` and `session` now, in AdMob's order.
pub fn callback_params(
    user: &str,
    session: &str,
    transaction: &str,
) -> Vec<(&'static str, String, String)> {
    let now = chrono::Utc::now().timestamp_millis().to_string();
    [
        ("ad_network", "5450213213286189855".to_owned()),
        ("ad_unit", "1234567890".to_owned()),
        ("custom_data", session.to_owned()),
        ("reward_amount", "1".to_owned()),
        ("reward_item", "Reward".to_owned()),
        ("timestamp", now),
        ("transaction_id", transaction.to_owned()),
        ("user_id", user.to_owned()),
    ]
    .into_iter()
    .map(|(n, v)| (n, encode(&v, false), v))
    .collect()
}

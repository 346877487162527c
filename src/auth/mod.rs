//! Supabase access tokens (docs/api.md, "Authentication"): verification and the extractors that are the only
//! place handlers learn who is calling.
//!
//! A token is verified once per request by [`identify`], which the router's `/v1` middleware
//! calls before the rate limit; the extractors ([`AuthUser`], [`AdminCaller`]) read its verdict.

pub mod cache;
mod es256;
pub mod jwks;
mod jws;

use std::sync::Arc;

use crate::db::ServicePool;
use axum::extract::{FromRef, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use jsonwebtoken::Algorithm;
use serde_json::Value;
use uuid::Uuid;

use crate::config::JwtConfig;
use crate::error::ApiError;
use cache::TokenCache;
use jwks::JwksCache;

/// Allowed clock skew for `exp` and `nbf`.
pub const LEEWAY_SECONDS: u64 = 60;

/// The database role a token speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Anon,
    Authenticated,
    ServiceRole,
    Other,
}

/// A token whose signature and claims have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub role: Role,
    pub user_id: Option<Uuid>,
    pub is_anonymous: bool,
    /// The claims as signed, handed to PostgreSQL as `request.jwt.claims`.
    pub claims: Arc<str>,
}

/// Why a token was refused; the text goes into the 401's `detail`.
pub type Refusal = &'static str;

/// Checks tokens against the configured HS256 secret and the JWKS keys, and remembers the
/// ones it accepted until they expire (`JWT_CACHE_SIZE`, [`cache`]).
pub struct TokenVerifier {
    hs256: Option<jws::Hs256Key>,
    jwks: Option<JwksCache>,
    audience: String,
    issuer: Option<String>,
    cache: Option<TokenCache>,
}

impl TokenVerifier {
    pub fn new(config: &JwtConfig, http: reqwest::Client) -> Self {
        es256::install();
        Self {
            hs256: config
                .secret
                .as_ref()
                .map(|s| jws::Hs256Key::new(s.expose().as_bytes())),
            jwks: config
                .jwks_url
                .clone()
                .map(|url| JwksCache::new(url, http, config.jwks_timing)),
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
            cache: TokenCache::new(config.cache_size),
        }
    }

    /// Tokens remembered now (0 with the cache off).
    pub fn cached_tokens(&self) -> usize {
        self.cache.as_ref().map_or(0, TokenCache::len)
    }

    /// Fetches the JWKS ahead of the first request, when one is configured.
    pub async fn prefetch(&self) {
        if let Some(jwks) = &self.jwks {
            jwks.prefetch().await;
        }
    }

    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, Refusal> {
        let Some(cache) = &self.cache else {
            return self.check(token).await.map(|entry| entry.token);
        };
        let key = cache::digest(token);
        if let Some(entry) = cache.get(&key, jsonwebtoken::get_current_timestamp()) {
            match &entry.jwks_key {
                None => return Ok(entry.token),
                Some((kid, checked_with)) => {
                    if let Some(jwks) = &self.jwks
                        && let Some(current) = jwks.key(kid).await
                        && Arc::ptr_eq(&current.key, checked_with)
                    {
                        return Ok(entry.token);
                    }
                    cache.remove(&key);
                }
            }
        }
        let entry = self.check(token).await?;
        let token = entry.token.clone();
        cache.insert(key, entry);
        Ok(token)
    }

    /// Checks the signature and the claims.
    async fn check(&self, token: &str) -> Result<cache::Entry, Refusal> {
        let parts = jws::Compact::split(token).ok_or("malformed token")?;
        let header = parts.header().ok_or("malformed token")?;

        // Algorithms are pinned to their key source: HS256 only with the project secret,
        // asymmetric algorithms only with a JWKS key of that same algorithm.
        let (algorithm, jwks_key) = match header.alg {
            Algorithm::HS256 => {
                self.hs256
                    .as_ref()
                    .ok_or("HS256 tokens are not accepted here")?
                    .verify(&parts)?;
                (Algorithm::HS256, None)
            }
            Algorithm::HS384 | Algorithm::HS512 => return Err("unsupported signing algorithm"),
            alg => {
                let jwks = self
                    .jwks
                    .as_ref()
                    .ok_or("asymmetric tokens are not accepted here")?;
                let kid = header
                    .kid
                    .as_deref()
                    .ok_or("the token names no key (kid)")?;
                let found = jwks.key(kid).await.ok_or("unknown signing key (kid)")?;
                if found.algorithm != alg {
                    return Err("the signing algorithm does not match the key");
                }
                parts.verify_with(&found.key, alg)?;
                (alg, Some((Arc::from(kid), found.key)))
            }
        };

        // `exp` is required and, like `nbf`, checked with the leeway; audience and issuer are
        // checked below, because the legacy service_role key has neither and is accepted on
        // its own terms.
        let (claims, signed_payload) = parts.claims(jsonwebtoken::get_current_timestamp())?;

        let role = match claims.role.as_deref() {
            Some("anon") => Role::Anon,
            Some("authenticated") => Role::Authenticated,
            Some("service_role") => Role::ServiceRole,
            _ => Role::Other,
        };

        let legacy_service_key = algorithm == Algorithm::HS256
            && role == Role::ServiceRole
            && claims.aud.is_none()
            && claims.sub.is_none()
            && claims.iss.as_deref() == Some("supabase");
        if !legacy_service_key {
            if !audience_matches(claims.aud.as_ref(), &self.audience) {
                return Err("wrong audience");
            }
            if let Some(issuer) = &self.issuer
                && claims.iss.as_deref() != Some(issuer.as_str())
            {
                return Err("wrong issuer");
            }
        }

        let user_id = match &claims.sub {
            None => None,
            Some(Value::String(sub)) => {
                Some(Uuid::parse_str(sub).map_err(|_| "the subject is not a user id")?)
            }
            Some(_) => return Err("the subject is not a user id"),
        };

        Ok(cache::Entry {
            token: VerifiedToken {
                role,
                user_id,
                is_anonymous: claims.is_anonymous.unwrap_or(false),
                claims: signed_payload.into(),
            },
            // The bounds `claims` has just checked, with the same leeway.
            valid_through: claims.exp.saturating_add(LEEWAY_SECONDS),
            valid_from: claims
                .nbf
                .map_or(0, |nbf| nbf.saturating_sub(LEEWAY_SECONDS)),
            jwks_key,
        })
    }
}

fn audience_matches(aud: Option<&Value>, expected: &str) -> bool {
    match aud {
        Some(Value::String(a)) => a == expected,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(expected)),
        _ => false,
    }
}

/// What the middleware found in the `Authorization` header.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No `Authorization` header.
    Nobody,
    Token(VerifiedToken),
    Refused(Refusal),
}

fn bearer_token(headers: &HeaderMap) -> Option<Result<&str, Refusal>> {
    let value = headers.get(header::AUTHORIZATION)?;
    let Ok(value) = value.to_str() else {
        return Some(Err("malformed Authorization header"));
    };
    let mut parts = value.splitn(2, ' ');
    let scheme = parts.next().unwrap_or_default();
    let token = parts.next().map(str::trim).unwrap_or_default();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Some(Err("expected Authorization: Bearer <token>"));
    }
    Some(Ok(token))
}

/// Routes that also take the token as `?access_token=`: event streams, which browsers open
/// with `EventSource`, which cannot send headers. Nowhere else: a token in a URL is easily
/// leaked (history, proxies' logs), and this service never logs one (no URL's query is ever
/// logged or used as a metric label).
pub const QUERY_TOKEN_PATHS: &[&str] = &["/v1/me/events"];

/// `access_token` from the query string, on the routes of [`QUERY_TOKEN_PATHS`].
fn query_token(request: &Request) -> Option<Result<String, Refusal>> {
    if !QUERY_TOKEN_PATHS.contains(&request.uri().path()) {
        return None;
    }
    let query = request.uri().query()?;
    let token = form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "access_token")
        .map(|(_, value)| value.trim().to_owned())?;
    Some(if token.is_empty() {
        Err("the access_token parameter is empty")
    } else {
        Ok(token)
    })
}

/// Verifies the bearer token, if any, once per request, and records the verdict as the
/// request's [`Caller`] for the extractors and the rate limiter. The `Authorization` header
/// comes first; the query string is read only where [`QUERY_TOKEN_PATHS`] allows it. (The
/// router calls it for every `/v1` request.)
pub async fn identify(verifier: &TokenVerifier, request: &mut Request) {
    let caller = match bearer_token(request.headers()) {
        Some(found) => verdict(verifier, found).await,
        None => match query_token(request) {
            Some(found) => verdict(verifier, found.as_deref().map_err(|why| *why)).await,
            None => Caller::Nobody,
        },
    };
    request.extensions_mut().insert(caller);
}

async fn verdict(verifier: &TokenVerifier, found: Result<&str, Refusal>) -> Caller {
    match found {
        Err(why) => Caller::Refused(why),
        Ok(token) => match verifier.verify(token).await {
            Ok(verified) => Caller::Token(verified),
            Err(why) => Caller::Refused(why),
        },
    }
}

fn caller(parts: &Parts) -> Result<&VerifiedToken, ApiError> {
    match parts.extensions.get::<Caller>() {
        Some(Caller::Token(token)) => Ok(token),
        Some(Caller::Refused(why)) => Err(ApiError::InvalidToken(why)),
        Some(Caller::Nobody) | None => Err(ApiError::InvalidToken("no bearer token was sent")),
    }
}

/// A signed-in user (`role = authenticated` with a `sub`).
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub id: Uuid,
    pub is_anonymous: bool,
    pub claims: Arc<str>,
}

impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let token = caller(parts)?;
        if token.role != Role::Authenticated {
            return Err(ApiError::Forbidden("this route is for signed-in users"));
        }
        let id = token
            .user_id
            .ok_or(ApiError::InvalidToken("the token has no subject"))?;
        Ok(AuthUser {
            id,
            is_anonymous: token.is_anonymous,
            claims: token.claims.clone(),
        })
    }
}

/// Who is acting on an admin route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminCaller {
    /// The project's service_role key.
    ServiceRole,
    /// A user whose profile has `is_admin = true`.
    Admin(Uuid),
}

impl AdminCaller {
    /// The actor as recorded in the ledger and idempotency records.
    pub fn actor(&self) -> String {
        match self {
            AdminCaller::ServiceRole => "service_role".to_owned(),
            AdminCaller::Admin(id) => id.to_string(),
        }
    }
}

impl<S> FromRequestParts<S> for AdminCaller
where
    S: Send + Sync,
    ServicePool: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let token = caller(parts)?;
        match (token.role, token.user_id) {
            (Role::ServiceRole, _) => Ok(AdminCaller::ServiceRole),
            (Role::Authenticated, Some(id)) => {
                // Admin status is read fresh: revoking it takes effect at once.
                let is_admin =
                    sqlx::query_scalar!("select is_admin from public.profiles where id = $1", id)
                        .fetch_optional(&ServicePool::from_ref(state))
                        .await?;
                if is_admin == Some(true) {
                    Ok(AdminCaller::Admin(id))
                } else {
                    Err(ApiError::Forbidden("this route is for admins"))
                }
            }
            _ => Err(ApiError::Forbidden("this route is for admins")),
        }
    }
}

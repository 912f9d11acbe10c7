//! Authentication (JWT bearer tokens) and the authorization rules of the wallet API.
//!
//! Only the configured algorithm is accepted (never `none`, never a switch from an asymmetric
//! key to HMAC), `exp` is required, with a small leeway for clock skew; `aud` and `iss` are
//! required and checked when the server is configured with them.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Clock skew tolerated on `exp`, in seconds.
pub const LEEWAY_SECONDS: u64 = 10;

pub const SCOPE_TRANSFER: &str = "wallet:transfer";
pub const SCOPE_READ: &str = "wallet:read";
pub const SCOPE_ADMIN: &str = "wallet:admin";
/// The shortest HS256 secret `serve` accepts (and `wallet token` mints with): the key size of
/// the hash, as RFC 7518 section 3.2 requires.
pub const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    /// Space-separated scopes.
    #[serde(default)]
    pub scope: String,
    pub exp: u64,
}

/// `Claims` as decoded, with the `aud` claim in whatever shape it came.
#[derive(Deserialize)]
struct Decoded {
    #[serde(flatten)]
    claims: Claims,
    #[serde(default)]
    aud: Option<serde_json::Value>,
}

/// What a token must name besides a valid signature: `aud` and `iss`, when they are set
/// (`--jwt-audience`, `--jwt-issuer`). A key shared with other services then cannot be used to
/// call this one with their tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expect {
    pub audience: Option<String>,
    pub issuer: Option<String>,
}

/// The claims `mint` writes: `Claims` and the optional audience and issuer.
#[derive(Serialize)]
struct MintClaims<'a> {
    sub: &'a str,
    scope: &'a str,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

pub enum Auth {
    /// No authentication (loopback only): every caller may do everything.
    None,
    Jwt {
        key: Box<DecodingKey>,
        validation: Box<Validation>,
    },
}

/// Who is calling and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub sub: String,
    pub transfer: bool,
    pub read: bool,
    pub admin: bool,
}

impl Caller {
    pub fn unauthenticated(peer: &str) -> Caller {
        Caller {
            sub: format!("anonymous@{peer}"),
            transfer: true,
            read: true,
            admin: true,
        }
    }

    /// May move money out of `account`.
    pub fn may_debit(&self, account: &str) -> bool {
        self.admin || (self.transfer && self.sub == account)
    }

    /// May read `account`'s balances and history.
    pub fn may_read(&self, account: &str) -> bool {
        self.admin || ((self.read || self.transfer) && self.sub == account)
    }

    /// Why this caller may not read `account` (`None`: it may): the scope it lacks, or that
    /// the account is not its own.
    pub fn read_refusal(&self, account: &str) -> Option<&'static str> {
        if self.may_read(account) {
            None
        } else if !(self.read || self.transfer) {
            Some("reading an account needs the wallet:read (or wallet:transfer) scope")
        } else {
            Some("a caller may only read its own account")
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Malformed,
    Invalid(String),
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Missing => f.write_str("missing bearer token"),
            AuthError::Malformed => f.write_str("malformed Authorization header"),
            AuthError::Invalid(reason) => write!(f, "invalid token: {reason}"),
        }
    }
}

impl Auth {
    pub fn hs256(secret: &[u8], expect: &Expect) -> Auth {
        Auth::Jwt {
            key: Box::new(DecodingKey::from_secret(secret)),
            validation: Box::new(validation(Algorithm::HS256, expect)),
        }
    }

    /// An RS256 or EdDSA public key in PEM, chosen by what the file holds.
    pub fn public_key(path: &Path, expect: &Expect) -> anyhow::Result<Auth> {
        let pem = std::fs::read(path)?;
        if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
            return Ok(Auth::Jwt {
                key: Box::new(key),
                validation: Box::new(validation(Algorithm::EdDSA, expect)),
            });
        }
        let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| {
            anyhow::anyhow!(
                "{}: neither an Ed25519 nor an RSA public key: {e}",
                path.display()
            )
        })?;
        Ok(Auth::Jwt {
            key: Box::new(key),
            validation: Box::new(validation(Algorithm::RS256, expect)),
        })
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Auth::None)
    }

    /// Checks the `Authorization` header value.
    pub fn authenticate(&self, header: Option<&str>, peer: &str) -> Result<Caller, AuthError> {
        let (key, validation) = match self {
            Auth::None => return Ok(Caller::unauthenticated(peer)),
            Auth::Jwt { key, validation } => (key, validation),
        };
        let header = header.ok_or(AuthError::Missing)?;
        // The scheme name is case-insensitive (RFC 9110, section 11.1).
        let token = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token)
            .filter(|t| !t.is_empty() && !t.contains(' '))
            .ok_or(AuthError::Malformed)?;
        let data = jsonwebtoken::decode::<Decoded>(token, key, validation)
            .map_err(|e| AuthError::Invalid(e.kind().to_owned_reason()))?;
        // Without an expected audience, the library refuses a string or list `aud` but lets
        // any other shape (`5`, `{}`) through: a token naming an audience in any form is for
        // another service.
        if validation.aud.is_none() && data.claims.aud.is_some_and(|aud| !aud.is_null()) {
            return Err(AuthError::Invalid(
                "the token names an audience, and this server expects none".into(),
            ));
        }
        let claims = data.claims.claims;
        if crate::core::AccountId::new(&claims.sub).is_err() {
            return Err(AuthError::Invalid("sub is not an account id".into()));
        }
        let scopes: Vec<&str> = claims.scope.split_whitespace().collect();
        Ok(Caller {
            transfer: scopes.contains(&SCOPE_TRANSFER),
            read: scopes.contains(&SCOPE_READ),
            admin: scopes.contains(&SCOPE_ADMIN),
            sub: claims.sub,
        })
    }
}

trait Reason {
    fn to_owned_reason(&self) -> String;
}

impl Reason for jsonwebtoken::errors::ErrorKind {
    fn to_owned_reason(&self) -> String {
        use jsonwebtoken::errors::ErrorKind as K;
        match self {
            K::ExpiredSignature => "expired".into(),
            K::InvalidSignature => "bad signature".into(),
            K::InvalidAlgorithm => "algorithm not accepted".into(),
            K::MissingRequiredClaim(c) => format!("missing claim {c}"),
            K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => {
                "not a well-formed JWT".into()
            }
            other => format!("{other:?}"),
        }
    }
}

fn validation(algorithm: Algorithm, expect: &Expect) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.algorithms = vec![algorithm];
    validation.leeway = LEEWAY_SECONDS;
    validation.validate_exp = true;
    // A token is refused before its `nbf` (not before), when it has one.
    validation.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    if let Some(audience) = &expect.audience {
        validation.set_audience(&[audience]);
        required.push("aud");
    }
    if let Some(issuer) = &expect.issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// Mints an HS256 token (development and load tests). A secret shorter than `serve` accepts is
/// refused: no server would take the token.
pub fn mint(
    secret: &[u8],
    sub: &str,
    scope: &str,
    ttl: std::time::Duration,
) -> anyhow::Result<String> {
    mint_for(secret, sub, scope, ttl, &Expect::default())
}

/// `mint`, naming the audience and issuer a server with `--jwt-audience`/`--jwt-issuer` expects.
pub fn mint_for(
    secret: &[u8],
    sub: &str,
    scope: &str,
    ttl: std::time::Duration,
    names: &Expect,
) -> anyhow::Result<String> {
    anyhow::ensure!(
        secret.len() >= MIN_SECRET_BYTES,
        "the HS256 secret must be at least {MIN_SECRET_BYTES} bytes"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = MintClaims {
        sub,
        scope,
        exp: now + ttl.as_secs(),
        aud: names.audience.as_deref(),
        iss: names.issuer.as_deref(),
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )?)
}

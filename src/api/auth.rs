//! Authentication (JWT bearer tokens) and the authorization rules of the wallet API.
//!
//! Only the configured algorithm is accepted (never `none`, never a switch from an asymmetric
//! key to HMAC), and no header parameter marked critical (`crit`: none is implemented). The
//! library checks the signature and the algorithm; the claims are checked here, each refusal
//! naming its claim and reason: `exp` is required (a NumericDate, fractions allowed, with a
//! small leeway for clock skew), `nbf` honoured, `sub` an account id, `scope` scope tokens
//! separated by single spaces (RFC 6749, 3.3); `aud` and `iss` are required and checked when
//! the server is configured with them. A claim given twice is refused.

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

/// The claims this server reads, each in whatever JSON shape it came (`null` reads as
/// absent), checked one by one in `check_claims`. Named fields: a claim given twice is refused
/// by the JSON reader, not silently taken from its last copy. Read from a JSON object only
/// (RFC 7519, 7.2): the derived reader also took an array, its elements by position as
/// `[sub, scope, exp, nbf, aud]`.
struct RawClaims(RawClaimFields);

impl<'de> Deserialize<'de> for RawClaims {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = RawClaims;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("the claims as a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawClaims, A::Error> {
                RawClaimFields::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawClaims)
            }
        }
        deserializer.deserialize_map(Object)
    }
}

#[derive(Deserialize)]
struct RawClaimFields {
    #[serde(default)]
    sub: Option<serde_json::Value>,
    #[serde(default)]
    scope: Option<serde_json::Value>,
    #[serde(default)]
    exp: Option<serde_json::Value>,
    #[serde(default)]
    nbf: Option<serde_json::Value>,
    #[serde(default)]
    aud: Option<serde_json::Value>,
    #[serde(default)]
    iss: Option<serde_json::Value>,
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
        /// The signature and algorithm only; the claims are checked by `check_claims`.
        validation: Box<Validation>,
        expect: Expect,
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
    /// the account is not its own; with the scope that would grant the read.
    pub fn read_refusal(&self, account: &str) -> Option<(&'static str, &'static str)> {
        if self.may_read(account) {
            None
        } else if !(self.read || self.transfer) {
            Some((
                "reading an account needs the wallet:read (or wallet:transfer) scope",
                "wallet:read",
            ))
        } else {
            Some(("a caller may only read its own account", "wallet:admin"))
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Malformed,
    /// More than one `Authorization` header: which one a proxy checked is unknown.
    Repeated,
    Invalid(String),
}

impl AuthError {
    /// The `WWW-Authenticate` challenge of a 401 (RFC 6750, 3): no error code when no token
    /// came, `invalid_request` for a malformed or repeated header, `invalid_token` for a token
    /// refused.
    pub fn challenge(&self) -> &'static str {
        match self {
            AuthError::Missing => "Bearer",
            AuthError::Malformed | AuthError::Repeated => r#"Bearer error="invalid_request""#,
            AuthError::Invalid(_) => r#"Bearer error="invalid_token""#,
        }
    }
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Missing => f.write_str("missing bearer token"),
            AuthError::Malformed => f.write_str(
                "malformed Authorization header: expected `Bearer <token>`, one space, visible ASCII",
            ),
            AuthError::Repeated => f.write_str("more than one Authorization header"),
            AuthError::Invalid(reason) => write!(f, "invalid token: {reason}"),
        }
    }
}

impl Auth {
    pub fn hs256(secret: &[u8], expect: &Expect) -> Auth {
        Auth::Jwt {
            key: Box::new(DecodingKey::from_secret(secret)),
            validation: Box::new(validation(Algorithm::HS256)),
            expect: expect.clone(),
        }
    }

    /// An RS256 or EdDSA public key in PEM, chosen by what the file holds.
    pub fn public_key(path: &Path, expect: &Expect) -> anyhow::Result<Auth> {
        let pem = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("--jwt-public-key {}: {e}", path.display()))?;
        // The RSA reader takes a private key too (its public half is in it), and every token
        // then failed as a "bad signature": a server given the signer's private key would
        // refuse every caller, and hold a key it must not have.
        anyhow::ensure!(
            !pem.windows(b"PRIVATE KEY-----".len())
                .any(|w| w == b"PRIVATE KEY-----"),
            "{}: this is a private key; --jwt-public-key takes the public key (`openssl pkey -in KEY -pubout`), and the server should not hold the signer's private key",
            path.display()
        );
        if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
            return Ok(Auth::Jwt {
                key: Box::new(key),
                validation: Box::new(validation(Algorithm::EdDSA)),
                expect: expect.clone(),
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
            validation: Box::new(validation(Algorithm::RS256)),
            expect: expect.clone(),
        })
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Auth::None)
    }

    /// Checks the `Authorization` header value (`Err(Malformed)` for one that is not visible
    /// ASCII).
    pub fn authenticate(
        &self,
        header: Option<Result<&str, AuthError>>,
        peer: &str,
    ) -> Result<Caller, AuthError> {
        let (key, validation, expect) = match self {
            Auth::None => return Ok(Caller::unauthenticated(peer)),
            Auth::Jwt {
                key,
                validation,
                expect,
            } => (key, validation, expect),
        };
        let header = header.ok_or(AuthError::Missing)??;
        // The scheme name is case-insensitive (RFC 9110, section 11.1).
        let token = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token)
            .filter(|t| !t.is_empty() && !t.contains(' '))
            .ok_or(AuthError::Malformed)?;
        let data = jsonwebtoken::decode::<RawClaims>(token, key, validation)
            .map_err(|e| AuthError::Invalid(e.kind().to_owned_reason()))?;
        // A header marking parameters critical (`crit`, RFC 7515 4.1.11): none is
        // implemented here, and a token that needs one understood must not be taken without it.
        if data.header.crit.is_some() {
            return Err(AuthError::Invalid(
                "the header marks parameters critical (crit), and this server implements none"
                    .into(),
            ));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let (sub, scope) = check_claims(data.claims.0, expect, now).map_err(AuthError::Invalid)?;
        // Scope tokens are separated by single spaces (RFC 6749, 3.3): any other character,
        // a no-break space or a tab included, is part of a (then unknown) scope. Splitting on
        // every kind of whitespace read "wallet:read\u{a0}wallet:admin", one scope to an
        // identity provider, as admin.
        let scopes: Vec<&str> = scope.split(' ').collect();
        Ok(Caller {
            transfer: scopes.contains(&SCOPE_TRANSFER),
            read: scopes.contains(&SCOPE_READ),
            admin: scopes.contains(&SCOPE_ADMIN),
            sub,
        })
    }
}

/// A NumericDate claim (RFC 7519, 2: seconds since 1970, fractions allowed): its value, or
/// why it is refused.
fn numeric_date(name: &str, value: &serde_json::Value) -> Result<f64, String> {
    value
        .as_f64()
        .filter(|v| v.is_finite())
        .ok_or_else(|| format!("claim {name} is not a number of seconds since 1970"))
}

/// Checks the claims (at `now`, seconds since 1970): the caller's account (`sub`) and its
/// scopes, or why the token is refused, naming the claim.
fn check_claims(
    claims: RawClaimFields,
    expect: &Expect,
    now: f64,
) -> Result<(String, String), String> {
    use serde_json::Value;
    let leeway = LEEWAY_SECONDS as f64;
    let exp = claims.exp.ok_or("missing claim exp")?;
    if numeric_date("exp", &exp)? < now - leeway {
        return Err("expired".into());
    }
    if let Some(nbf) = &claims.nbf
        && numeric_date("nbf", nbf)? > now + leeway
    {
        return Err("not yet valid: its nbf is in the future".into());
    }
    let sub = match claims.sub.ok_or("missing claim sub")? {
        Value::String(sub) if crate::core::AccountId::new(&sub).is_ok() => sub,
        Value::String(_) => return Err("sub is not an account id".into()),
        _ => return Err("claim sub is not a string".into()),
    };
    let scope = match claims.scope {
        None => String::new(),
        Some(Value::String(scope)) => scope,
        Some(_) => return Err("claim scope is not a string".into()),
    };
    match (&expect.audience, claims.aud) {
        (None, None) => {}
        // A token naming an audience, in any shape, is for another service.
        (None, Some(_)) => {
            return Err("the token names an audience, and this server expects none".into());
        }
        (Some(_), None) => return Err("missing claim aud".into()),
        (Some(ours), Some(aud)) => {
            let named: Vec<&str> = match &aud {
                Value::String(one) => vec![one.as_str()],
                Value::Array(many) if many.iter().all(Value::is_string) => {
                    many.iter().filter_map(Value::as_str).collect()
                }
                _ => return Err("claim aud is neither a string nor a list of strings".into()),
            };
            if !named.contains(&ours.as_str()) {
                return Err(format!("aud does not name this server's audience ({ours})"));
            }
        }
    }
    if let Some(ours) = &expect.issuer {
        // One issuer, a string (RFC 7519, 4.1.1): a list naming ours among others is refused.
        match claims.iss.ok_or("missing claim iss")? {
            Value::String(iss) if iss == *ours => {}
            Value::String(_) => return Err(format!("iss is not this server's issuer ({ours})")),
            _ => return Err("claim iss is not a string".into()),
        }
    }
    Ok((sub, scope))
}

trait Reason {
    fn to_owned_reason(&self) -> String;
}

impl Reason for jsonwebtoken::errors::ErrorKind {
    fn to_owned_reason(&self) -> String {
        use jsonwebtoken::errors::ErrorKind as K;
        // The claims are checked in `check_claims`: the library sees the signature, the
        // algorithm and the token's shape only. Its own names (`ImmatureSignature`, ...) are
        // never shown.
        match self {
            K::InvalidSignature => "bad signature".into(),
            K::InvalidAlgorithm | K::MissingAlgorithm | K::InvalidAlgorithmName => {
                "algorithm not accepted".into()
            }
            // What serde says of the claims, a claim given twice included; it quotes no value.
            K::Json(e) => format!("not a well-formed JWT: {e}"),
            _ => "not a well-formed JWT".into(),
        }
    }
}

/// The library's checks: the signature, with `algorithm` only. The claims are `check_claims`'s:
/// the library's `exp` must be a whole number, and its refusals do not say which claim failed
/// or why.
fn validation(algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.algorithms = vec![algorithm];
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.set_required_spec_claims::<&str>(&[]);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name)
    }

    fn signed(private: &str, algorithm: Algorithm) -> String {
        let pem = std::fs::read(fixture(private)).expect("fixture");
        let key = match algorithm {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .expect("private key");
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 600;
        let claims = Claims {
            sub: "alice".into(),
            scope: SCOPE_READ.into(),
            exp,
        };
        jsonwebtoken::encode(&Header::new(algorithm), &claims, &key).expect("sign")
    }

    /// Public keys of both kinds verify their private halves' tokens; a private key given as
    /// the public one is refused at start, naming the file. An RSA private key was taken, and
    /// then refused every token as a "bad signature".
    #[test]
    fn public_keys_verify_and_private_keys_are_refused() {
        for (public, private, algorithm) in [
            (
                "jwt-rsa-public.pem",
                "jwt-rsa-private.pem",
                Algorithm::RS256,
            ),
            (
                "jwt-ed25519-public.pem",
                "jwt-ed25519-private.pem",
                Algorithm::EdDSA,
            ),
        ] {
            let auth = Auth::public_key(&fixture(public), &Expect::default()).expect(public);
            let header = format!("Bearer {}", signed(private, algorithm));
            let caller = auth
                .authenticate(Some(Ok(header.as_str())), "127.0.0.1:1")
                .unwrap_or_else(|e| panic!("{public}: {e:?}"));
            assert_eq!(caller.sub, "alice");
            assert!(caller.read && !caller.admin && !caller.transfer);
        }
        for private in [
            "jwt-rsa-private.pem",
            "jwt-rsa-private-pkcs1.pem",
            "jwt-ed25519-private.pem",
        ] {
            let error = Auth::public_key(&fixture(private), &Expect::default())
                .err()
                .unwrap_or_else(|| panic!("{private} was taken as a public key"))
                .to_string();
            assert!(
                error.contains(private) && error.contains("this is a private key"),
                "{error}"
            );
        }
    }
}

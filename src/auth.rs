//! JWT → [`Identity`], and which rooms an identity is put in or may join.
//!
//! Tokens come from three source systems with different claim names (SPEC §2),
//! so claims are read from a JSON object rather than a fixed struct. The
//! signature, the algorithm (exactly one, fixed by the configured key) and
//! `exp` are always checked, `nbf` when present, `iss`/`aud` when configured;
//! a token whose `token_type` is present and not `access` (a simplejwt
//! refresh token) is refused. Which claims hold the user, role, city and
//! driver is configuration ([`ClaimMapping`], SPEC §2).

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Value, json};

use crate::config::{ClaimMapping, Config, JwtKey};
use crate::event::room;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Admin,
    Ceo,
    Manager,
    Driver,
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Ceo => "ceo",
            Role::Manager => "manager",
            Role::Driver => "driver",
            Role::User => "user",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "admin" => Role::Admin,
            "ceo" => Role::Ceo,
            "manager" => Role::Manager,
            "driver" => Role::Driver,
            "user" => Role::User,
            _ => return None,
        })
    }
    /// Admins and CEOs see everything.
    pub fn is_staff(self) -> bool {
        matches!(self, Role::Admin | Role::Ceo)
    }
}

/// Who is calling, as the token says.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub user_id: i64,
    pub role: Role,
    /// Cities a manager manages (`city_ids`, else `city_id`).
    pub city_ids: Vec<i64>,
    /// The city of a driver or user.
    pub city_id: Option<i64>,
    /// The driver id (defaults to the user id).
    pub driver_id: i64,
}

impl Identity {
    /// The rooms a connection is put in at connect (SPEC §3).
    pub fn auto_rooms(&self) -> Vec<String> {
        let mut rooms = Vec::with_capacity(2 + self.city_ids.len());
        if self.role.is_staff() {
            rooms.push(room::ADMIN.to_string());
        }
        if self.role == Role::Manager {
            rooms.extend(self.city_ids.iter().map(|c| room::city(*c)));
        }
        rooms.push(room::user(self.user_id));
        if self.role == Role::Driver {
            rooms.push(room::driver(self.driver_id));
        }
        rooms
    }

    /// Whether `join-room` may name `name`: admin/ceo any valid room, a manager
    /// its cities' rooms, anyone the rooms it was put in at connect.
    pub fn may_join(&self, name: &str) -> bool {
        if !room::is_valid(name) {
            return false;
        }
        if self.role.is_staff() {
            return true;
        }
        self.auto_rooms().iter().any(|r| r == name)
    }
}

/// Why a token was refused. What a client is shown (`Display`) is our own
/// fixed wording: jsonwebtoken's error kinds (`InvalidToken`, `Base64(…)`,
/// `Json(…)`, …) stay in the variant's detail, for the log only (SPEC §11:
/// no internal error text reaches a client).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    /// A `token_type` other than `access` (e.g. a simplejwt refresh token).
    #[error("wrong token type: an access token is required")]
    NotAccess(String),
    /// Malformed, badly signed, wrong algorithm, a required claim missing
    /// or failing its check; the detail says which, for the log.
    #[error("invalid token")]
    Invalid(String),
    /// A well-signed token whose claims do not name a user as configured
    /// (our own message, written for the client's developers).
    #[error("invalid token: {0}")]
    Claims(String),
}

impl AuthError {
    /// What the log may say beyond the client's message (never the token).
    pub fn detail(&self) -> Option<&str> {
        match self {
            AuthError::NotAccess(d) | AuthError::Invalid(d) => Some(d),
            _ => None,
        }
    }
}

/// Verifies tokens; built once per node from the config.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// Present only for HS256: the dev-token printer and `token` use it.
    signer: Option<EncodingKey>,
    claims: ClaimMapping,
}

impl Verifier {
    pub fn new(config: &Config) -> anyhow::Result<Verifier> {
        let (key, alg, signer) = match &config.jwt_key {
            JwtKey::Secret { secret, .. } => (
                DecodingKey::from_secret(secret),
                Algorithm::HS256,
                Some(EncodingKey::from_secret(secret)),
            ),
            JwtKey::PublicPem(pem) => {
                if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                    (k, Algorithm::RS256, None)
                } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
                    (k, Algorithm::ES256, None)
                } else {
                    anyhow::bail!(
                        "JWT_PUBLIC_KEY_FILE holds neither an RSA nor an EC public key in PEM"
                    );
                }
            }
        };
        // One algorithm only: a token signed with anything else (including
        // `none` or HS256 with the public key as secret) is refused.
        let mut validation = Validation::new(alg);
        validation.leeway = config.jwt_leeway_secs;
        validation.set_required_spec_claims(&["exp"]);
        // `nbf` is checked when the token has one (jsonwebtoken skips a
        // missing `nbf` even with this on).
        validation.validate_nbf = true;
        validation.validate_aud = false;
        if let Some(iss) = &config.jwt_issuer {
            validation.set_issuer(&[iss]);
            validation.set_required_spec_claims(&["exp", "iss"]);
        }
        if let Some(aud) = &config.jwt_audience {
            validation.set_audience(&[aud]);
            validation.validate_aud = true;
        }
        Ok(Verifier {
            key,
            validation,
            signer,
            claims: config.claims.clone(),
        })
    }

    pub fn verify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Value>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                // jsonwebtoken's own text stays in the detail (the log).
                k => AuthError::Invalid(format!("{k:?}")),
            },
        )?;
        match data.claims.get("token_type") {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) if t == "access" => {}
            Some(t) => {
                let t = t
                    .as_str()
                    .map(String::from)
                    .unwrap_or_else(|| t.to_string());
                return Err(AuthError::NotAccess(t));
            }
        }
        identity_with(&data.claims, &self.claims).map_err(AuthError::Claims)
    }

    /// Mints a token (HS256 only). `claims` gets `exp` = now + `ttl_secs`.
    pub fn mint(&self, mut claims: Value, ttl_secs: u64) -> anyhow::Result<String> {
        let signer = self
            .signer
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("tokens can only be minted with JWT_SECRET (HS256)"))?;
        let exp = jsonwebtoken::get_current_timestamp() + ttl_secs;
        claims["exp"] = json!(exp);
        claims["iat"] = json!(jsonwebtoken::get_current_timestamp());
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            signer,
        )?)
    }
}

fn as_id(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The value at a dotted path (`app.role`).
fn at<'a>(c: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(c, |v, k| v.get(k.as_str()))
        .filter(|v| !v.is_null())
}

/// A role claim value through `JWT_ROLE_MAP`, else a role name itself.
fn map_role(value: &str, m: &ClaimMapping) -> Option<Role> {
    m.role_map
        .iter()
        .find(|(v, _)| v == value)
        .and_then(|(_, r)| Role::parse(r))
        .or_else(|| Role::parse(value))
}

/// The first value of a string-or-array claim that maps to a role.
fn role_of(v: &Value, m: &ClaimMapping) -> Option<Role> {
    match v {
        Value::String(s) => map_role(s, m),
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .find_map(|s| map_role(s, m)),
        _ => None,
    }
}

/// Reads the claim variants of SPEC §2 with the built-in claim names.
pub fn identity_from_claims(c: &Value) -> Result<Identity, String> {
    identity_with(c, &ClaimMapping::default())
}

/// Reads the identity from claims as `m` says (SPEC §2): configured paths
/// first, else the built-in variants; `JWT_ROLE_MAP` applies to the role
/// claim and to `groups`; a token without a role gets `JWT_DEFAULT_ROLE`.
pub fn identity_with(c: &Value, m: &ClaimMapping) -> Result<Identity, String> {
    let user_id = match &m.user {
        Some(path) => at(c, path)
            .and_then(as_id)
            .ok_or_else(|| format!("no integer user id in {}", path.join(".")))?,
        None => ["sub", "user_id", "userId"]
            .iter()
            .find_map(|k| c.get(*k).and_then(as_id))
            .ok_or("no integer user id in sub, user_id or userId")?,
    };
    let role = match &m.role {
        Some(path) => at(c, path).and_then(|v| role_of(v, m)),
        None => c.get("role").and_then(|v| role_of(v, m)).or_else(|| {
            let groups = c.get("groups").and_then(Value::as_array)?;
            let has = |name: &str| groups.iter().any(|x| x.as_str() == Some(name));
            if has("Admin") {
                Some(Role::Admin)
            } else if has("Driver") {
                Some(Role::Driver)
            } else if m.role_map.is_empty() {
                None
            } else {
                role_of(&Value::Array(groups.clone()), m)
            }
        }),
    }
    .or_else(|| Role::parse(&m.default_role))
    .unwrap_or(Role::User);
    let (city_value, city_list) = match &m.city {
        Some(path) => (at(c, path), None),
        None => (c.get("city_id"), c.get("city_ids")),
    };
    let (city_id, mut city_ids) = match city_value {
        Some(Value::Array(a)) => (None, a.iter().filter_map(as_id).collect::<Vec<_>>()),
        Some(v) => (as_id(v), Vec::new()),
        None => (None, Vec::new()),
    };
    if let Some(Value::Array(a)) = city_list {
        city_ids = a.iter().filter_map(as_id).collect();
    }
    if city_ids.is_empty() && role == Role::Manager {
        city_ids.extend(city_id);
    }
    let driver_id = match &m.driver {
        Some(path) => at(c, path),
        None => c.get("driver_id"),
    }
    .and_then(as_id)
    .unwrap_or(user_id);
    Ok(Identity {
        user_id,
        role,
        city_ids,
        city_id,
        driver_id,
    })
}

/// Claims for a token of `role` (dev tokens, `switchboard token`, tests).
pub fn claims_for(role: Role, user_id: i64, city_ids: &[i64], driver_id: Option<i64>) -> Value {
    let mut c = json!({"sub": user_id.to_string(), "role": role.as_str()});
    match role {
        Role::Manager => c["city_ids"] = json!(city_ids),
        Role::Driver | Role::User => {
            if let Some(city) = city_ids.first() {
                c["city_id"] = json!(city);
            }
        }
        Role::Admin | Role::Ceo => {}
    }
    if let Some(d) = driver_id {
        c["driver_id"] = json!(d);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> Verifier {
        let mut c = Config::defaults();
        c.jwt_key = JwtKey::Secret {
            secret: b"0123456789abcdef0123".to_vec(),
            generated: false,
        };
        Verifier::new(&c).unwrap()
    }

    #[test]
    fn claim_variants() {
        let simplejwt = json!({"user_id": 7, "groups": ["Driver"], "exp": 1});
        let id = identity_from_claims(&simplejwt).unwrap();
        assert_eq!((id.user_id, id.role, id.driver_id), (7, Role::Driver, 7));
        let node = json!({"userId": "12", "role": "manager", "city_ids": [1, "2"]});
        let id = identity_from_claims(&node).unwrap();
        assert_eq!(id.city_ids, vec![1, 2]);
        assert_eq!(
            id.auto_rooms(),
            vec!["city-1-orders", "city-2-orders", "user-12"]
        );
        let admin = json!({"sub": "1", "groups": ["Admin"]});
        assert_eq!(identity_from_claims(&admin).unwrap().role, Role::Admin);
        assert!(identity_from_claims(&json!({"sub": "abc"})).is_err());
        let user = json!({"sub": 3});
        assert_eq!(identity_from_claims(&user).unwrap().role, Role::User);
    }

    #[test]
    fn configured_claims() {
        let mut m = ClaimMapping {
            default_role: "driver".into(),
            ..ClaimMapping::default()
        };
        // A stock simplejwt access token has no role: the default applies.
        let stock = json!({"user_id": 9, "token_type": "access", "jti": "x", "exp": 1});
        let id = identity_with(&stock, &m).unwrap();
        assert_eq!((id.user_id, id.role, id.driver_id), (9, Role::Driver, 9));
        m.role = Some(vec!["app".into(), "roles".into()]);
        m.role_map = vec![("Staff".into(), "manager".into())];
        m.city = Some(vec!["app".into(), "cities".into()]);
        m.user = Some(vec!["uid".into()]);
        let nested = json!({"uid": "4", "app": {"roles": ["Guest", "Staff"], "cities": [3, 4]}});
        let id = identity_with(&nested, &m).unwrap();
        assert_eq!((id.user_id, id.role), (4, Role::Manager));
        assert_eq!(id.city_ids, vec![3, 4]);
        assert!(
            identity_with(&json!({"sub": 1}), &m).is_err(),
            "user claim configured"
        );
        m.driver = Some(vec!["drv".into(), "id".into()]);
        let id = identity_with(&json!({"uid": 4, "drv": {"id": 77}}), &m).unwrap();
        assert_eq!((id.role, id.driver_id), (Role::Driver, 77));
    }

    #[test]
    fn join_rules() {
        let mgr =
            identity_from_claims(&json!({"sub": 2, "role": "manager", "city_ids": [5]})).unwrap();
        assert!(mgr.may_join("city-5-orders"));
        assert!(!mgr.may_join("city-6-orders"));
        assert!(!mgr.may_join("admin-orders"));
        assert!(mgr.may_join("user-2"));
        assert!(!mgr.may_join("user-3"));
        let admin = identity_from_claims(&json!({"sub": 1, "role": "admin"})).unwrap();
        assert!(admin.may_join("city-6-orders"));
        assert!(!admin.may_join("bad room"));
    }

    /// A refused token is told in our words; jsonwebtoken's error kind
    /// (`InvalidToken`, `Base64(…)`, `Json(…)`, `InvalidSignature`) is only
    /// in the detail, for the log.
    #[test]
    fn refusals_are_told_in_our_words() {
        let v = verifier();
        let header = |h: &str| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h)
        };
        let malformed = [
            "not-a-jwt".to_string(),
            "a.b.c".to_string(),
            "....".to_string(),
            format!("{}.{}.c2ln", header("not json"), header("{}")),
            format!("{}.{}.c2ln", header(r#"{"alg":"HS256"}"#), header("[1,2")),
            format!(
                "{}.{}.c2ln",
                header(r#"{"alg":"none"}"#),
                header(r#"{"sub":1}"#)
            ),
            format!(
                "{}.{}.c2ln",
                header(r#"{"alg":"HS256"}"#),
                header(r#"{"sub":1,"exp":9999999999}"#)
            ),
        ];
        for t in &malformed {
            let e = v.verify(Some(t)).unwrap_err();
            assert_eq!(e.to_string(), "invalid token", "{t}: {e:?}");
            assert!(e.detail().is_some_and(|d| !d.is_empty()), "{t}");
        }
        let sign = |c: Value| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &c,
                &EncodingKey::from_secret(b"0123456789abcdef0123"),
            )
            .unwrap()
        };
        let exp = jsonwebtoken::get_current_timestamp() + 600;
        let e = v
            .verify(Some(&sign(json!({"sub": "x", "exp": exp}))))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid token: no integer user id in sub, user_id or userId"
        );
        let e = v
            .verify(Some(&sign(
                json!({"sub": 1, "exp": exp, "token_type": "refresh"}),
            )))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "wrong token type: an access token is required"
        );
    }

    #[test]
    fn tokens_are_verified() {
        let v = verifier();
        let t = v.mint(claims_for(Role::Admin, 1, &[], None), 60).unwrap();
        assert_eq!(v.verify(Some(&t)).unwrap().role, Role::Admin);
        assert_eq!(v.verify(None), Err(AuthError::Missing));
        // Expired.
        let mut c = claims_for(Role::User, 1, &[], None);
        c["exp"] = json!(jsonwebtoken::get_current_timestamp() - 10);
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &c,
            &EncodingKey::from_secret(b"0123456789abcdef0123"),
        )
        .unwrap();
        assert_eq!(v.verify(Some(&t)), Err(AuthError::Expired));
        // Wrong secret.
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": 1, "exp": jsonwebtoken::get_current_timestamp() + 60}),
            &EncodingKey::from_secret(b"another-secret-of-20"),
        )
        .unwrap();
        assert!(matches!(v.verify(Some(&t)), Err(AuthError::Invalid(_))));
        // Wrong algorithm with the right secret.
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &json!({"sub": 1, "exp": jsonwebtoken::get_current_timestamp() + 60}),
            &EncodingKey::from_secret(b"0123456789abcdef0123"),
        )
        .unwrap();
        assert!(matches!(v.verify(Some(&t)), Err(AuthError::Invalid(_))));
        let sign = |c: Value| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &c,
                &EncodingKey::from_secret(b"0123456789abcdef0123"),
            )
            .unwrap()
        };
        let now = jsonwebtoken::get_current_timestamp();
        // Not valid before a minute from now.
        let t = sign(json!({"sub": 1, "exp": now + 600, "nbf": now + 60}));
        assert_eq!(v.verify(Some(&t)), Err(AuthError::NotYetValid));
        let t = sign(json!({"sub": 1, "exp": now + 600, "nbf": now - 1}));
        assert!(v.verify(Some(&t)).is_ok());
        // A refresh token; an access token.
        let t = sign(json!({"user_id": 1, "exp": now + 600, "token_type": "refresh"}));
        assert_eq!(
            v.verify(Some(&t)),
            Err(AuthError::NotAccess("refresh".into()))
        );
        let t = sign(json!({"user_id": 1, "exp": now + 600, "token_type": "access"}));
        assert!(v.verify(Some(&t)).is_ok());
        // No exp.
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": 1}),
            &EncodingKey::from_secret(b"0123456789abcdef0123"),
        )
        .unwrap();
        assert!(matches!(v.verify(Some(&t)), Err(AuthError::Invalid(_))));
    }
}

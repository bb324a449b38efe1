//! JWT → [`Identity`], and which rooms an identity is put in or may join.
//!
//! Tokens come from three source systems with different claim names (SPEC §2),
//! so claims are read from a JSON object rather than a fixed struct. The
//! signature, the algorithm (exactly one, fixed by the configured key) and
//! `exp` are always checked; `iss`/`aud` when configured.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Value, json};

use crate::config::{Config, JwtKey};
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

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Verifies tokens; built once per node from the config.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// Present only for HS256: the dev-token printer and `token` use it.
    signer: Option<EncodingKey>,
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
        })
    }

    pub fn verify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Value>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                k => AuthError::Invalid(format!("{k:?}")),
            },
        )?;
        identity_from_claims(&data.claims).map_err(AuthError::Invalid)
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

/// Reads the claim variants of SPEC §2.
pub fn identity_from_claims(c: &Value) -> Result<Identity, String> {
    let user_id = ["sub", "user_id", "userId"]
        .iter()
        .find_map(|k| c.get(*k).and_then(as_id))
        .ok_or("no integer user id in sub, user_id or userId")?;
    let groups = |name: &str| {
        c.get("groups")
            .and_then(Value::as_array)
            .is_some_and(|g| g.iter().any(|x| x.as_str() == Some(name)))
    };
    let role = c
        .get("role")
        .and_then(Value::as_str)
        .and_then(Role::parse)
        .unwrap_or(if groups("Admin") {
            Role::Admin
        } else if groups("Driver") {
            Role::Driver
        } else {
            Role::User
        });
    let city_id = c.get("city_id").and_then(as_id);
    let mut city_ids: Vec<i64> = c
        .get("city_ids")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(as_id).collect())
        .unwrap_or_default();
    if city_ids.is_empty() && role == Role::Manager {
        city_ids.extend(city_id);
    }
    let driver_id = c.get("driver_id").and_then(as_id).unwrap_or(user_id);
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

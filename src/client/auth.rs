//! Front-end authentication: the `default` user's password (requirepass style) and named
//! users whose passwords are stored as SHA-256 hashes. Comparisons are constant-time.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::config::AuthConfig;
use crate::error::Error;

/// The front end's users; replaced whole by a reload (SIGHUP). Connections already
/// authenticated stay so, as in Redis after ACL changes to passwords.
pub struct Auth {
    inner: std::sync::RwLock<Users>,
}

struct Users {
    default_hash: Option<[u8; 32]>,
    /// Name → (password hash, read-only, own namespace).
    users: HashMap<String, ([u8; 32], bool, Option<String>)>,
}

/// Who a connection authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    /// Write commands are refused with NOPERM.
    pub readonly: bool,
    /// The user's own key namespace (else the configured `namespace`).
    pub namespace: Option<String>,
}

impl Principal {
    pub fn default_user() -> Principal {
        Principal {
            name: "default".into(),
            readonly: false,
            namespace: None,
        }
    }
}

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn from_hex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(chunk).ok()?;
        *out.get_mut(i)? = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    pub fn new(cfg: &AuthConfig) -> Auth {
        Auth {
            inner: std::sync::RwLock::new(Users::new(cfg)),
        }
    }

    pub fn reload(&self, cfg: &AuthConfig) {
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = Users::new(cfg);
    }

    fn users(&self) -> std::sync::RwLockReadGuard<'_, Users> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a new connection must authenticate before running commands.
    pub fn required(&self) -> bool {
        self.users().required()
    }

    /// Checks `AUTH [user] pass`; returns who authenticated.
    pub fn check(&self, user: Option<&[u8]>, pass: &[u8]) -> Result<Principal, Error> {
        self.users().check(user, pass)
    }
}

impl Users {
    fn new(cfg: &AuthConfig) -> Users {
        Users {
            default_hash: cfg
                .password
                .as_deref()
                .filter(|p| !p.is_empty())
                .map(|p| sha256(p.as_bytes())),
            users: cfg
                .users
                .iter()
                // validate() checked the hex; a bad entry can never match.
                .filter_map(|u| {
                    let hash = from_hex(&u.password_sha256)?;
                    Some((u.name.clone(), (hash, u.readonly, u.namespace.clone())))
                })
                .collect(),
        }
    }

    fn required(&self) -> bool {
        self.default_hash.is_some() || !self.users.is_empty()
    }

    fn check(&self, user: Option<&[u8]>, pass: &[u8]) -> Result<Principal, Error> {
        let given = sha256(pass);
        match user {
            None | Some(b"default") => {
                if user.is_none() && !self.required() {
                    return Err(Error::redis(
                        "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
                    ));
                }
                match &self.default_hash {
                    Some(h) if ct_eq(h, &given) => Ok(Principal::default_user()),
                    // Redis's default user is "nopass" when no password is set.
                    None if !self.required() => Ok(Principal::default_user()),
                    _ => Err(Error::wrongpass()),
                }
            }
            Some(name) => {
                let name = String::from_utf8_lossy(name);
                match self.users.get(name.as_ref()) {
                    Some((h, readonly, namespace)) if ct_eq(h, &given) => Ok(Principal {
                        name: name.into_owned(),
                        readonly: *readonly,
                        namespace: namespace.clone(),
                    }),
                    _ => Err(Error::wrongpass()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UserConfig;

    #[test]
    fn users_and_default() {
        let hash: String = sha256(b"pw2").iter().map(|b| format!("{b:02x}")).collect();
        let a = Auth::new(&AuthConfig {
            password: Some("pw".into()),
            users: vec![
                UserConfig {
                    name: "app".into(),
                    password_sha256: hash.clone(),
                    readonly: false,
                    namespace: None,
                },
                UserConfig {
                    name: "reader".into(),
                    password_sha256: hash,
                    readonly: true,
                    namespace: Some("r:".into()),
                },
            ],
        });
        assert!(a.required());
        assert_eq!(a.check(None, b"pw").unwrap(), Principal::default_user());
        let app = a.check(Some(b"app"), b"pw2").unwrap();
        assert_eq!((app.name.as_str(), app.readonly), ("app", false));
        let reader = a.check(Some(b"reader"), b"pw2").unwrap();
        assert_eq!((reader.name.as_str(), reader.readonly), ("reader", true));
        assert_eq!(reader.namespace.as_deref(), Some("r:"));
        assert!(a.check(Some(b"app"), b"pw").is_err());
        assert!(a.check(None, b"nope").is_err());
        let open = Auth::new(&AuthConfig::default());
        assert!(!open.required());
        assert!(open
            .check(None, b"x")
            .unwrap_err()
            .to_string()
            .contains("without any password"));
    }
}

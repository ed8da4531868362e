//! Typed identifiers: node IDs, cluster IDs and roles.
//!
//! IDs are 25 lowercase base-36 characters drawn from the OS random source (about
//! 129 bits), the shape Docker Swarm uses, so they are safe to print and to put in
//! a certificate's CN or O.

use std::fmt;
use std::str::FromStr;

const ID_LEN: usize = 25;
const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// A malformed identifier or role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Not 25 characters of `[0-9a-z]`.
    #[error("invalid {kind} {value:?}: expected 25 characters of [0-9a-z]")]
    Malformed { kind: &'static str, value: String },
    /// Not a known role name.
    #[error("invalid role {0:?}: expected \"manager\" or \"worker\"")]
    UnknownRole(String),
}

fn random_id() -> String {
    let mut raw = [0u8; ID_LEN];
    crate::random_bytes(&mut raw);
    // 256 % 36 != 0; the bias (< 1 %) does not matter for identifiers.
    raw.iter().map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char).collect()
}

fn check_id(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.len() == ID_LEN && s.bytes().all(|b| ALPHABET.contains(&b)) {
        Ok(())
    } else {
        Err(IdError::Malformed { kind, value: s.chars().take(64).collect() })
    }
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// A fresh random identifier.
            pub fn random() -> Self {
                Self(random_id())
            }
            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                check_id($kind, s)?;
                Ok(Self(s.to_owned()))
            }
        }
        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                check_id($kind, &s)?;
                Ok(Self(s))
            }
        }
        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

typed_id!(
    /// A node's identity: the CN of its certificate.
    NodeId,
    "node ID"
);
typed_id!(
    /// The cluster's identity: the O of every certificate its CA issues.
    ClusterId,
    "cluster ID"
);
typed_id!(
    /// A secret's identity (stable across its versions).
    SecretId,
    "secret ID"
);
typed_id!(
    /// A service's identity.
    ServiceId,
    "service ID"
);
typed_id!(
    /// A task's identity: one run of one replica on one node.
    TaskId,
    "task ID"
);

/// What a certificate allows its holder to do. It is the certificate's OU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs raft, the CA and the control API; may call every RPC.
    Manager,
    /// Runs tasks; may call only the worker RPCs (session, heartbeat, renewal).
    Worker,
    /// An operator's client certificate: may call only the control API over
    /// mTLS. Not a node: never holds a session, never joins raft, has no join
    /// token (so it never parses from a role name).
    Admin,
}

impl Role {
    /// The certificate OU for this role.
    pub fn org_unit(self) -> &'static str {
        match self {
            Role::Manager => "swarm-manager",
            Role::Worker => "swarm-worker",
            Role::Admin => "swarm-admin",
        }
    }

    /// The role whose certificate OU is `ou`.
    pub fn from_org_unit(ou: &str) -> Option<Role> {
        match ou {
            "swarm-manager" => Some(Role::Manager),
            "swarm-worker" => Some(Role::Worker),
            "swarm-admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl FromStr for Role {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        match s {
            "manager" => Ok(Role::Manager),
            "worker" => Ok(Role::Worker),
            _ => Err(IdError::UnknownRole(s.chars().take(64).collect())),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
            Role::Admin => "admin",
        })
    }
}

/// The one rule for a secret's file name below `/run/secrets` in a task's
/// container, applied by the manager when a service names it and by the
/// worker when it writes the file: 1–255 characters of `[A-Za-z0-9._-]`,
/// not `.` or `..` (so no path, no traversal, nothing hidden by a slash).
pub fn is_secret_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        let id = NodeId::random();
        assert_eq!(id.as_str().len(), 25);
        let back: NodeId = id.to_string().parse().unwrap();
        assert_eq!(back, id);
        let cid = ClusterId::random();
        assert_eq!(cid.to_string().parse::<ClusterId>().unwrap(), cid);
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in ["", "short", "ABCDEFGHIJKLMNOPQRSTUVWXY", "abcdefghijklmnopqrstuvwx-", "abcdefghijklmnopqrstuvwxyz"]
        {
            assert!(bad.parse::<NodeId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn roles_round_trip() {
        for r in [Role::Manager, Role::Worker] {
            assert_eq!(r.to_string().parse::<Role>().unwrap(), r);
            assert_eq!(Role::from_org_unit(r.org_unit()), Some(r));
        }
        // Admins have certificates but no join token: the role never parses from a name.
        assert_eq!(Role::from_org_unit(Role::Admin.org_unit()), Some(Role::Admin));
        assert!("admin".parse::<Role>().is_err());
        assert_eq!(Role::from_org_unit("swarm-root"), None);
    }

    #[test]
    fn secret_file_names() {
        for ok in ["db_pass", "db.pass", "A-1", "..x", &"a".repeat(255)] {
            assert!(is_secret_file_name(ok), "{ok:?}");
        }
        for bad in ["", ".", "..", "a/b", "/run/secrets/x", "a b", "ä", &"a".repeat(256), "x\0"] {
            assert!(!is_secret_file_name(bad), "{bad:?}");
        }
    }
}

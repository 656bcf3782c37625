//! CNI errors: the spec's well-known codes plus this plugin's own (100 and up).
//!
//! Every error carries a message naming the cause, because the runtime shows `msg` to the
//! operator in `kubectl describe pod` and that is often all they get to see.

use serde::Serialize;

/// Error codes from the CNI spec (1.1, "Error" section) and plugin-specific ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnv = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// STATUS: the plugin cannot set up new pods.
    NotAvailable = 50,
    /// The kernel refused a step of wiring the pod.
    Netlink = 100,
    /// CHECK found the pod's network not as ADD left it.
    CheckFailed = 101,
    /// ipamd answered, but refused the request for a reason that retrying will not fix.
    IpamRefused = 102,
}

#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The JSON object the spec wants on stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version,
            code: self.code as u32,
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or_else(|_| format!("{{\"code\":{},\"msg\":\"error\"}}", self.code as u32))
    }
}

pub type Result<T, E = CniError> = std::result::Result<T, E>;

/// Wrap a netlink failure with the step that failed.
pub fn netlink(step: &str, err: impl std::fmt::Display) -> CniError {
    CniError::new(Code::Netlink, format!("{step}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_spec_fields() {
        let e = CniError::new(Code::TryAgainLater, "pool empty").with_details("d");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 11);
        assert_eq!(v["msg"], "pool empty");
        assert_eq!(v["details"], "d");
        let e = CniError::new(Code::Decode, "x");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.1.0")).unwrap();
        assert!(v.get("details").is_none());
    }
}

//! CNI spec versions this plugin speaks.

use crate::error::{CniError, Code, Result};

pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST: &str = "1.1.0";

/// A parsed `major.minor.patch`, comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        let mut it = s.split('.').map(|p| p.parse::<u32>().ok());
        let v = Version(it.next()??, it.next()??, it.next().unwrap_or(Some(0))?);
        if it.next().is_some() {
            return None;
        }
        Some(v)
    }

    /// 0.3.x and 0.4.0 results tag each IP with `"version": "4"`; 1.x dropped it.
    pub fn is_legacy(self) -> bool {
        self.0 == 0
    }
}

/// Validate the config's `cniVersion` against what we support.
pub fn check(s: &str) -> Result<Version> {
    if !SUPPORTED.contains(&s) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "incompatible CNI version {s:?}: aws-cni supports {}",
                SUPPORTED.join(", ")
            ),
        ));
    }
    Version::parse(s).ok_or_else(|| CniError::new(Code::IncompatibleVersion, "bad cniVersion"))
}

/// The reply to `CNI_COMMAND=VERSION`.
pub fn version_reply(requested: Option<&str>) -> String {
    let v = requested
        .filter(|r| SUPPORTED.contains(r))
        .unwrap_or(LATEST);
    serde_json::json!({ "cniVersion": v, "supportedVersions": SUPPORTED }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders() {
        assert!(Version::parse("0.4.0").unwrap() < Version::parse("1.0.0").unwrap());
        assert!(Version::parse("1.1.0").unwrap() > Version::parse("1.0.0").unwrap());
        assert_eq!(Version::parse("1.x"), None);
        assert!(Version::parse("0.3.1").unwrap().is_legacy());
    }

    #[test]
    fn rejects_unsupported() {
        assert_eq!(check("0.2.0").unwrap_err().code, Code::IncompatibleVersion);
        assert_eq!(check("2.0.0").unwrap_err().code, Code::IncompatibleVersion);
        assert_eq!(check("1.1.0").unwrap(), Version(1, 1, 0));
    }

    #[test]
    fn version_reply_lists_all() {
        let v: serde_json::Value = serde_json::from_str(&version_reply(Some("0.4.0"))).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
        let v: serde_json::Value = serde_json::from_str(&version_reply(Some("9.9.9"))).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
    }
}

//! The rules for what a runtime or a plugin may hand us, checked at both edges (the plugin's
//! environment and ipamd's gRPC requests) with the same words.
//!
//! Container ids, network names and interface names follow the CNI spec as libcni checks
//! them; lengths are bounded so no request can store megabytes per pod.

/// libcni's `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
fn cni_chars(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphanumeric())
        && c.all(|x| x.is_ascii_alphanumeric() || matches!(x, '_' | '.' | '-'))
}

/// Runtimes use 64 hex characters; this leaves room for any id a runtime makes up.
pub const MAX_CONTAINER_ID: usize = 1024;
/// Kubernetes object names and namespaces are DNS subdomains (at most 253).
pub const MAX_K8S_NAME: usize = 253;
/// UIDs are 36 characters.
pub const MAX_UID: usize = 128;
/// A netns path, as the kernel bounds paths.
pub const MAX_PATH: usize = 4096;
/// Version strings and free-text reasons.
pub const MAX_SHORT: usize = 128;
/// The kernel's IFNAMSIZ - 1.
pub const MAX_IFNAME: usize = 15;

/// Why a value was refused, with the field it was in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} bytes long, at most {max} allowed")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} {value:?} has characters outside {allowed}")]
    Characters {
        what: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error("{what} {value:?} is reserved ({why})")]
    Reserved {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}

const CNI_RULE: &str = "[A-Za-z0-9_.-] (starting with a letter or digit)";

fn cni_id(what: &'static str, s: &str, max: usize) -> Result<(), Invalid> {
    if s.is_empty() {
        return Err(Invalid::Empty { what });
    }
    if s.len() > max {
        return Err(Invalid::TooLong {
            what,
            len: s.len(),
            max,
        });
    }
    if !cni_chars(s) {
        return Err(Invalid::Characters {
            what,
            value: clip(s),
            allowed: CNI_RULE,
        });
    }
    Ok(())
}

pub fn container_id(s: &str) -> Result<(), Invalid> {
    cni_id("container id", s, MAX_CONTAINER_ID)
}

pub fn network_name(s: &str) -> Result<(), Invalid> {
    cni_id("network name", s, MAX_K8S_NAME)
}

/// The kernel's rules for an interface name, as libcni checks them.
pub fn ifname(s: &str) -> Result<(), Invalid> {
    const WHAT: &str = "interface name";
    if s.is_empty() {
        return Err(Invalid::Empty { what: WHAT });
    }
    if s.len() > MAX_IFNAME {
        return Err(Invalid::TooLong {
            what: WHAT,
            len: s.len(),
            max: MAX_IFNAME,
        });
    }
    if s == "." || s == ".." {
        return Err(Invalid::Reserved {
            what: WHAT,
            value: s.to_string(),
            why: "a path component",
        });
    }
    if s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err(Invalid::Characters {
            what: WHAT,
            value: clip(s),
            allowed: "anything but '/', ':' and whitespace",
        });
    }
    Ok(())
}

/// A free-form field (pod name, namespace, uid, path, version): only a length bound and no
/// control characters, which would otherwise reach logs and files verbatim.
pub fn bounded(what: &'static str, s: &str, max: usize) -> Result<(), Invalid> {
    if s.len() > max {
        return Err(Invalid::TooLong {
            what,
            len: s.len(),
            max,
        });
    }
    if s.chars().any(char::is_control) {
        return Err(Invalid::Characters {
            what,
            value: clip(s),
            allowed: "printable characters",
        });
    }
    Ok(())
}

/// At most 64 characters of a hostile value, for messages.
fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_as_libcni() {
        assert!(container_id("0123abcdef").is_ok());
        assert!(container_id("a.b_c-d").is_ok());
        for bad in ["", "-a", ".a", "k/x", "a b", "a\nb", "ä"] {
            assert!(container_id(bad).is_err(), "{bad:?}");
        }
        assert!(container_id(&"a".repeat(MAX_CONTAINER_ID + 1)).is_err());
        let e = container_id(&"a".repeat(3_000_000)).unwrap_err();
        assert!(e.to_string().len() < 200, "{e}");
        let e = container_id(&format!("k/{}", "x".repeat(500))).unwrap_err();
        assert!(e.to_string().len() < 200, "{e}");
    }

    #[test]
    fn interface_names_as_the_kernel() {
        assert!(ifname("eth0").is_ok());
        assert!(ifname("net1-x").is_ok());
        for bad in ["", ".", "..", "eth 0", "a/b", "a:b", "sixteen-chars-xx"] {
            assert!(ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn free_fields_are_bounded() {
        assert!(bounded("pod name", "web-0", MAX_K8S_NAME).is_ok());
        assert!(bounded("pod name", &"x".repeat(254), MAX_K8S_NAME).is_err());
        assert!(bounded("reason", "a\nb", MAX_SHORT).is_err());
    }
}

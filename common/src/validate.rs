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

pub fn container_id(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("container id is empty".into());
    }
    if s.len() > MAX_CONTAINER_ID {
        return Err(format!(
            "container id is {} bytes long, at most {MAX_CONTAINER_ID} allowed",
            s.len()
        ));
    }
    if !cni_chars(s) {
        return Err(format!(
            "container id {:?} has characters outside [A-Za-z0-9_.-] (or does not start with a letter or digit)",
            clip(s)
        ));
    }
    Ok(())
}

pub fn network_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("network name is empty".into());
    }
    if s.len() > MAX_K8S_NAME {
        return Err(format!(
            "network name is {} bytes long, at most {MAX_K8S_NAME} allowed",
            s.len()
        ));
    }
    if !cni_chars(s) {
        return Err(format!(
            "network name {:?} has characters outside [A-Za-z0-9_.-]",
            clip(s)
        ));
    }
    Ok(())
}

/// The kernel's rules for an interface name, as libcni checks them.
pub fn ifname(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("interface name is empty".into());
    }
    if s.len() > MAX_IFNAME {
        return Err(format!(
            "interface name {:?} is longer than {MAX_IFNAME} bytes",
            clip(s)
        ));
    }
    if s == "." || s == ".." {
        return Err(format!("interface name {s:?} is not allowed"));
    }
    if s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err(format!(
            "interface name {s:?} contains '/', ':' or whitespace"
        ));
    }
    Ok(())
}

/// A free-form field (pod name, namespace, uid, path, version): only a length bound and no
/// control characters, which would otherwise reach logs and files verbatim.
pub fn bounded(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!(
            "{what} is {} bytes long, at most {max} allowed",
            s.len()
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{what} {:?} contains control characters", clip(s)));
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
        assert!(e.len() < 200, "{e}");
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

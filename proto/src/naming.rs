//! Host-side veth names, exactly as upstream derives them so that an upstream node's pods are
//! recognised after switching plugins.

use sha1::{Digest, Sha1};

/// `<prefix>` + the first 11 hex characters of sha1("<namespace>.<pod name>").
pub fn host_veth_name(prefix: &str, pod_namespace: &str, pod_name: &str) -> String {
    let digest = Sha1::digest(format!("{pod_namespace}.{pod_name}").as_bytes());
    let mut hex = String::with_capacity(40);
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    format!("{prefix}{}", &hex[..11])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_upstream_scheme() {
        let n = host_veth_name("eni", "default", "nginx");
        assert_eq!(n.len(), 14);
        // sha1("default.nginx") from coreutils' sha1sum.
        assert_eq!(n, "enic440f455693");
        assert!(n.starts_with("eni"));
        assert_eq!(n, format!("eni{}", &sha1_hex("default.nginx")[..11]));
        assert_ne!(n, host_veth_name("eni", "default", "nginx2"));
        assert!(host_veth_name("abcd", "ns", "p").len() <= 15);
    }

    fn sha1_hex(s: &str) -> String {
        let out = std::process::Command::new("sha1sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(s.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        String::from_utf8(out.stdout).unwrap()[..40].to_string()
    }
}

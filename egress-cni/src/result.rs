//! The ADD result: the previous plugin's result passed on with the egress pair's two
//! interfaces appended, as upstream does (its addresses stay out: the pod's address is the
//! cluster one). Appending keeps every `ips[].interface` index of the previous result valid.
//! Pure.

use serde_json::{json, Value};

use aws_cni::error::{CniError, Code, Result};

/// One interface of the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// The pod's namespace, for the pod's end; None for the host's end.
    pub sandbox: Option<String>,
}

impl Interface {
    fn to_json(&self) -> Value {
        let mut v = json!({ "name": self.name, "mac": self.mac });
        if let Some(s) = &self.sandbox {
            v["sandbox"] = json!(s);
        }
        v
    }
}

fn prev_object(prev: &Value) -> Result<serde_json::Map<String, Value>> {
    prev.as_object().cloned().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            format!("prevResult is not a JSON object: {prev}"),
        )
    })
}

/// `prev` in `cni_version`, untouched otherwise (egress disabled).
pub fn pass_through(prev: &Value, cni_version: &str) -> Result<Value> {
    let mut out = prev_object(prev)?;
    out.insert("cniVersion".into(), json!(cni_version));
    Ok(Value::Object(out))
}

/// `prev` with `added` appended to its interfaces.
pub fn with_interfaces(prev: &Value, cni_version: &str, added: &[Interface]) -> Result<Value> {
    let mut out = prev_object(prev)?;
    let mut ifaces = match out.remove("interfaces") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(CniError::new(
                Code::InvalidConfig,
                format!("prevResult.interfaces is not a list: {other}"),
            ))
        }
    };
    ifaces.extend(added.iter().map(Interface::to_json));
    out.insert("interfaces".into(), Value::Array(ifaces));
    out.insert("cniVersion".into(), json!(cni_version));
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prev() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "eni0123456789a", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/p"}
            ],
            "ips": [{"address": "2001:db8::5/128", "gateway": "fe80::1", "interface": 1}],
            "routes": [{"dst": "::/0"}],
            "dns": {}
        })
    }

    fn added() -> Vec<Interface> {
        vec![
            Interface {
                name: "veth5740307710e".into(),
                mac: "02:00:00:00:00:01".into(),
                sandbox: None,
            },
            Interface {
                name: "v4if0".into(),
                mac: "02:00:00:00:00:02".into(),
                sandbox: Some("/var/run/netns/p".into()),
            },
        ]
    }

    #[test]
    fn appends_interfaces_and_keeps_the_rest() {
        for v in ["0.4.0", "1.0.0", "1.1.0"] {
            let out = with_interfaces(&prev(), v, &added()).unwrap();
            assert_eq!(out["cniVersion"], v);
            let ifaces = out["interfaces"].as_array().unwrap();
            assert_eq!(ifaces.len(), 4);
            assert_eq!(
                ifaces[2],
                json!({"name": "veth5740307710e", "mac": "02:00:00:00:00:01"})
            );
            assert_eq!(ifaces[3]["sandbox"], "/var/run/netns/p");
            // The pod's address still points at the pod's eth0.
            assert_eq!(out["ips"], prev()["ips"]);
            assert_eq!(out["routes"], prev()["routes"]);
        }
    }

    #[test]
    fn previous_result_without_interfaces() {
        let out = with_interfaces(
            &json!({"cniVersion": "0.4.0", "ips": []}),
            "0.4.0",
            &added(),
        )
        .unwrap();
        assert_eq!(out["interfaces"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn pass_through_only_sets_the_version() {
        let out = pass_through(&prev(), "1.0.0").unwrap();
        assert_eq!(out, prev());
        assert_eq!(
            pass_through(&json!([1]), "1.0.0").unwrap_err().code,
            Code::InvalidConfig
        );
        assert_eq!(
            with_interfaces(&json!({"interfaces": 3}), "1.0.0", &[])
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
    }
}

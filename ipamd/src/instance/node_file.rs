//! What ipamd knows about the instance it runs on. The EC2/IMDS source comes with the cloud
//! layer; the standalone source reads a JSON file, for development and for tests of the core
//! without any cloud.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::SystemTime;

use serde::Deserialize;

use crate::pool::datastore::Eni;

#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub instance_id: String,
    /// The region (IMDS); empty for a node file.
    pub region: String,
    pub instance_type: String,
    pub vpc_cidrs: Vec<ipnet::Ipv4Net>,
    pub enis: Vec<Eni>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("read node file {0}: {1}")]
    Read(String, std::io::Error),
    #[error("node file {0} is invalid: {1}")]
    Parse(String, String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileNode {
    instance_id: String,
    instance_type: String,
    #[serde(default)]
    vpc_cidrs: Vec<ipnet::Ipv4Net>,
    enis: Vec<FileEni>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileEni {
    id: String,
    device_number: u32,
    #[serde(default)]
    mac: String,
    #[serde(default)]
    subnet_cidr: ipnet::Ipv4Net,
    primary_ip: Ipv4Addr,
    #[serde(default)]
    ips: Vec<Ipv4Addr>,
    #[serde(default)]
    prefixes: Vec<String>,
}

use crate::cidr::parse_prefix;

pub fn load_node_file(path: &Path) -> Result<NodeInfo, NodeError> {
    let p = path.display().to_string();
    let data = std::fs::read(path).map_err(|e| NodeError::Read(p.clone(), e))?;
    let f: FileNode =
        serde_json::from_slice(&data).map_err(|e| NodeError::Parse(p.clone(), e.to_string()))?;
    let mut enis = Vec::new();
    for e in f.enis {
        let mut prefixes = Vec::new();
        for s in &e.prefixes {
            prefixes.push(parse_prefix(s).ok_or_else(|| {
                NodeError::Parse(
                    p.clone(),
                    format!("prefix {s:?} of {} is not an IPv4 /28", e.id),
                )
            })?);
        }
        enis.push(Eni {
            primary: e.device_number == 0,
            id: e.id,
            device_number: e.device_number,
            mac: e.mac,
            subnet_cidr: e.subnet_cidr,
            subnet_id: String::new(),
            primary_ip: e.primary_ip,
            ips: e.ips,
            prefixes,
            primary_ipv6: None,
            ipv6_prefixes: Vec::new(),
            attached_at: SystemTime::now(),
        });
    }
    if !enis.iter().any(|e| e.primary) {
        return Err(NodeError::Parse(
            p,
            "no ENI with deviceNumber 0 (the primary ENI)".into(),
        ));
    }
    Ok(NodeInfo {
        region: String::new(),
        instance_id: f.instance_id,
        instance_type: f.instance_type,
        vpc_cidrs: f.vpc_cidrs,
        enis,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::datastore::Prefix;

    #[test]
    fn reads_node_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("node.json");
        std::fs::write(
            &p,
            r#"{"instanceId":"i-1","instanceType":"t3.medium","vpcCidrs":["10.0.0.0/16"],
               "enis":[{"id":"eni-0","deviceNumber":0,"primaryIp":"10.0.1.10","ips":["10.0.1.11"]},
                       {"id":"eni-1","deviceNumber":1,"primaryIp":"10.0.1.20","prefixes":["10.0.16.0/28"]}]}"#,
        )
        .unwrap();
        let n = load_node_file(&p).unwrap();
        assert_eq!(n.enis.len(), 2);
        assert!(n.enis[0].primary);
        assert_eq!(
            n.enis[1].prefixes,
            vec![Prefix(Ipv4Addr::new(10, 0, 16, 0))]
        );
        std::fs::write(&p, r#"{"instanceId":"i","instanceType":"t","enis":[]}"#).unwrap();
        assert!(load_node_file(&p)
            .unwrap_err()
            .to_string()
            .contains("primary ENI"));
    }
}

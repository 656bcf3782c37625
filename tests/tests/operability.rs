//! What an operator reads off a running ipamd on the simulated VPC: introspection and
//! Prometheus metrics, checked against the pool's real state.

use integration::cloud::eventually;
use integration::sim::{http_get, NodeSpec, Sim};
use serde_json::Value;

fn metric(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix) && l[line_prefix.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn introspection_and_metrics_match_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sim::up(dir.path(), "o", &[NodeSpec::new("t3.medium", &[])]);
    for name in ["a", "b", "c"] {
        s.add_pod(0, name, "").unwrap();
    }
    let ns = s.nodes[0].ns().to_string();
    // Let the pool settle (the first pod makes ipamd attach a second ENI).
    eventually(20, "two ENIs", || (s.enis(0).len() == 2).then_some(()));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let enis = s.enis(0);
    let total: usize = enis.iter().map(|e| e.secondary.len()).sum();

    let (st, body) = http_get(&ns, "http://127.0.0.1:61679/v1/enis");
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let card = &v["0"];
    assert_eq!(card["AssignedIPs"], 3);
    assert_eq!(card["TotalIPs"], total);
    for e in &enis {
        let got = &card["ENIs"][&e.id];
        assert_eq!(got["DeviceNumber"], e.device, "{got}");
        assert!(
            got["SubnetID"].as_str().unwrap().starts_with("subnet-"),
            "{got}"
        );
        assert_eq!(got["IsPrimary"], e.device == 0);
        for ip in &e.secondary {
            let cidr = &got["AvailableIPv4Cidrs"][format!("{ip}/32")];
            assert_eq!(cidr["Cidr"]["Mask"], "/////w==", "{cidr}");
        }
    }
    for p in &s.nodes[0].pods {
        let dev = s.device_of(0, &p.ip).unwrap();
        let eni = &enis.iter().find(|e| e.device == dev).unwrap().id;
        let a =
            &card["ENIs"][eni]["AvailableIPv4Cidrs"][format!("{}/32", p.ip)]["IPAddresses"][&p.ip];
        assert_eq!(a["IPAMMetadata"]["k8sPodName"], p.name.as_str(), "{a}");
        assert_eq!(
            a["IPAMKey"]["containerID"], "",
            "container ids are scrubbed"
        );
        assert_ne!(a["AssignedTime"], "0001-01-01T00:00:00Z");
    }
    assert!(!body.contains("cid-"), "no container id anywhere");

    let (st, body) = http_get(&ns, "http://127.0.0.1:61679/v1/pods");
    assert_eq!(st, 200);
    let pods: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(pods.as_array().unwrap().len(), 3);
    // Upstream's settings endpoints: its keys, typed, with defaults applied.
    let (st, body) = http_get(&ns, "http://127.0.0.1:61679/v1/ipamd-env-settings");
    assert_eq!(st, 200);
    let env: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        env,
        serde_json::json!({"AWS_MANAGE_ENIS_NON_SCHEDULABLE": false,
            "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": false, "ENABLE_SUBNET_DISCOVERY": true,
            "WARM_ENI_TARGET": 1, "WARM_IP_TARGET": 0})
    );
    let (st, body) = http_get(&ns, "http://127.0.0.1:61679/v1/networkutils-env-settings");
    assert_eq!(st, 200);
    let env: Value = serde_json::from_str(&body).unwrap();
    let keys: Vec<&String> = env.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "AWS_EXTERNAL_SERVICE_CIDRS",
            "AWS_VPC_CNI_NODE_PORT_SUPPORT",
            "AWS_VPC_ENI_MTU",
            "AWS_VPC_K8S_CNI_CONNMARK",
            "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
            "AWS_VPC_K8S_CNI_EXTERNALSNAT",
            "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
            "AWS_VPC_K8S_CNI_VETHPREFIX"
        ]
    );
    assert_eq!(env["AWS_VPC_K8S_CNI_CONNMARK"], 128);
    assert_eq!(
        env["AWS_VPC_K8S_CNI_RANDOMIZESNAT"], 2,
        "prng, as Go's enum"
    );
    assert_eq!(env["AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS"], Value::Null);
    assert_eq!(env["AWS_VPC_ENI_MTU"], 9001);
    // `/` (and any unknown path, upstream's catch-all) lists the commands.
    for path in ["/", "/v1/nonsense"] {
        let (st, body) = http_get(&ns, &format!("http://127.0.0.1:61679{path}"));
        assert_eq!(st, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        let mut cmds: Vec<&str> = v["AvailableCommands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        cmds.sort();
        assert_eq!(
            cmds,
            [
                "/v1/eni-configs",
                "/v1/enis",
                "/v1/ipamd-env-settings",
                "/v1/networkutils-env-settings"
            ]
        );
    }
    // No Kubernetes API in this cluster: the node's ENIConfig name is not known.
    assert_eq!(
        http_get(&ns, "http://127.0.0.1:61679/v1/eni-configs").0,
        404
    );

    let (st, m) = http_get(&ns, "http://127.0.0.1:61678/metrics");
    assert_eq!(st, 200);
    assert_eq!(metric(&m, "awscni_assigned_ip_addresses"), Some(3.0), "{m}");
    assert_eq!(metric(&m, "awscni_total_ip_addresses"), Some(total as f64));
    assert_eq!(metric(&m, "awscni_eni_allocated"), Some(enis.len() as f64));
    assert_eq!(metric(&m, "awscni_eni_max"), Some(3.0));
    assert_eq!(metric(&m, "awscni_ip_max"), Some(15.0));
    assert_eq!(metric(&m, "awscni_add_ip_req_count"), Some(3.0));
    assert_eq!(metric(&m, "awscni_add_network_seconds_count"), Some(3.0));
    assert_eq!(metric(&m, "awscni_cooldown_ip_addresses"), Some(0.0));
    assert!(
        metric(
            &m,
            "awscni_ec2api_req_count{fn=\"AssignPrivateIpAddresses\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(
        metric(&m, "awscni_ec2api_req_count{fn=\"CreateNetworkInterface\"}"),
        Some(1.0)
    );
    // Upstream's shapes: build_info's labels, the API latency as a summary without quantiles,
    // the connmark series, the process collector.
    assert!(m.contains("awscni_build_info{goversion=\"rust-"), "{m}");
    assert!(m.contains("# TYPE awscni_aws_api_latency_ms summary"));
    assert!(m.contains(
        "awscni_aws_api_latency_ms_count{api=\"CreateNetworkInterface\",error=\"false\",status=\"200\"} 1"
    ));
    assert!(!m.contains("awscni_aws_api_latency_ms_bucket"));
    // This machine's iptables is nf_tables: upstream's nf_tables connmark back-end is in use.
    assert_eq!(
        metric(&m, "awscni_connmark_backend{backend=\"nftables\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "awscni_connmark_backend{backend=\"iptables\"}"),
        Some(0.0)
    );
    assert!(metric(&m, "awscni_connmark_reconcile_total{result=\"success\"}").unwrap() >= 1.0);
    assert_eq!(
        metric(&m, "awscni_connmark_reconcile_total{result=\"error\"}"),
        Some(0.0)
    );
    assert!(m.contains("awscni_ipamd_startup_duration_seconds_count{failure_reason=\"\",success=\"true\",with_api_server=\"false\"} 1"), "{m}");
    assert!(
        m.contains("awscni_ipamd_node_initialization_duration_seconds_count{success=\"true\"} 1")
    );
    assert!(metric(&m, "process_resident_memory_bytes").unwrap() > 1e6);
    assert!(metric(&m, "process_open_fds").unwrap() > 0.0);
    // Settled on its WARM_ENI_TARGET: short of nothing.
    assert_eq!(metric(&m, "awscni_pool_short"), Some(0.0), "{m}");
    assert!(metric(&m, "awscni_pool_over").is_some());

    // A DEL shows up as a cooling address.
    s.del_pod(0, "c");
    let (_, m) = http_get(&ns, "http://127.0.0.1:61678/metrics");
    assert_eq!(metric(&m, "awscni_assigned_ip_addresses"), Some(2.0));
    assert_eq!(metric(&m, "awscni_cooldown_ip_addresses"), Some(1.0));
    assert_eq!(
        metric(&m, "awscni_del_ip_req_count{reason=\"PodDeleted\"}"),
        Some(1.0),
        "{m}"
    );
    s.down();
}

/// ipamd's binaries are linked with packed relative relocations (ipamd/build.rs): a classic
/// relocation table is read whole at every start and stays resident (1.5 MB).
#[test]
fn ipamd_is_linked_with_packed_relative_relocations() {
    let bin = integration::bin("ipamd");
    let out = std::process::Command::new("readelf")
        .args(["--dynamic", "--wide"])
        .arg(&bin)
        .output()
        .expect("run readelf (binutils)");
    assert!(out.status.success(), "readelf {}: {out:?}", bin.display());
    let dynamic = String::from_utf8_lossy(&out.stdout);
    assert!(
        dynamic.lines().any(|l| l.contains("(RELR)")),
        "no DT_RELR in {}:\n{dynamic}",
        bin.display()
    );
}

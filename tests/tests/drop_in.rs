//! Swapping upstream's aws-node for ours: the network policy agent's contract (ipamd's
//! ConfigServerBackend, the plugin's NPBackend calls) and upstream's health probe, through the
//! real binaries.

use std::process::Command;

use cni_proto::config_server_backend_client::ConfigServerBackendClient;
use integration::cni::CniClient;
use integration::ipamd_proc::{client, enis, rt, Ipamd};
use integration::netns::Netns;
use integration::np_agent::{Call, FakeNpAgent};
use serde_json::json;

#[test]
fn network_policy_agent_is_told_and_asked_as_upstream() {
    let node = Netns::node("npn");
    let dir = tempfile::tempdir().unwrap();
    let d = Ipamd::standalone(
        dir.path(),
        Some(&node.name),
        "t3.medium",
        &enis(2, 5),
        &[("NETWORK_POLICY_ENFORCING_MODE", "standard")],
    );

    // What the agent asks at its start, with a client generated from rpc.proto's
    // ConfigServerBackend (upstream's service text).
    rt().block_on(async {
        let ch = cni_common::grpc::connect(
            &d.socket,
            std::time::Duration::from_secs(2),
            std::time::Duration::from_secs(2),
        )
        .await
        .unwrap();
        let r = ConfigServerBackendClient::new(ch)
            .get_network_policy_configs(())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.network_policy_mode, "standard");
        assert!(!r.multi_nic_enabled);
        assert_eq!(r.node_i_pv4, "10.0.1.10", "the primary ENI's address");
        assert!(!r.instance_id.is_empty());
        // And every reply to the plugin carries the mode.
        let mut c = client(&d.socket).await;
        let a = c
            .add_network(integration::ipamd_proc::add_req("direct"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(a.network_policy_mode, "standard");
        let r = c
            .del_network(integration::ipamd_proc::del_req("direct"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.network_policy_mode, "standard");
    });

    let npa = dir.path().join("npa.sock");
    let mut agent = FakeNpAgent::start(&npa, &node.name);
    let c = CniClient::new(&node.name, dir.path(), &d.socket);
    c.set_plugin_field("networkPolicyAgentSocket", json!(npa));

    // ADD: the agent is asked once the pod is wired (its veth exists).
    let web = Netns::new("npw");
    c.ok("add", "cid-web", &web, "web", "");
    assert_eq!(
        agent.calls(),
        vec![Call::Enforce {
            namespace: "default".into(),
            name: "web".into(),
            mode: "standard".into(),
            interfaces: 1,
            veth_present: true,
        }]
    );
    // DEL: the agent drops the pod's policy.
    c.ok("del", "cid-web", &web, "web", "");
    assert_eq!(
        agent.calls()[1],
        Call::Delete {
            namespace: "default".into(),
            name: "web".into()
        }
    );

    // An agent that says no fails the ADD, and the ADD leaves nothing behind.
    agent.state.lock().unwrap().refuse = true;
    let links_before = node.links();
    let pod = Netns::new("npr");
    let out = c.run("add", "cid-refused", &pod, "refused", "");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("network policy agent"), "{err}");
    assert_eq!(node.links(), links_before, "no host veth left");
    assert!(
        !pod.links_now().iter().any(|l| l == "eth0"),
        "no pod interface left"
    );
    // ... and its address went back: the checkpoint holds no allocation for it.
    let ckpt = std::fs::read_to_string(&d.checkpoint).unwrap();
    assert!(!ckpt.contains("cid-refused"), "{ckpt}");

    // An agent that cannot be reached fails DEL (upstream's rule); once it is back, the
    // runtime's retry goes through.
    agent.state.lock().unwrap().refuse = false;
    let db = Netns::new("npd");
    c.ok("add", "cid-db", &db, "db", "");
    agent.stop();
    let out = c.run("del", "cid-db", &db, "db", "");
    assert!(!out.status.success(), "DEL with the agent away");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("network policy agent unreachable"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent = FakeNpAgent::start(&npa, &node.name);
    c.ok("del", "cid-db", &db, "db", "");
    assert!(agent.calls().contains(&Call::Delete {
        namespace: "default".into(),
        name: "db".into()
    }));
}

#[test]
fn upstream_health_probe_command_works_against_ipamd() {
    let dir = tempfile::tempdir().unwrap();
    // One ENI with two addresses: easy to exhaust.
    let d = Ipamd::standalone(dir.path(), None, "t3.medium", &enis(1, 2), &[]);
    let probe = dir.path().join("grpc-health-probe");
    std::os::unix::fs::symlink(integration::bin("aws-vpc-cni"), &probe).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(&probe).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let addr = format!("-addr=unix://{}", d.socket.display());
    // Upstream manifest's command line, exactly.
    let upstream = [addr.as_str(), "-connect-timeout=5s", "-rpc-timeout=5s"];
    assert_eq!(run(&upstream).0, Some(0));
    assert_eq!(run(&[&addr, "-service=grpc.health.v1.aws-node"]).0, Some(0));
    // Exhaust the pool: upstream's probe (service "") still passes - no restart for an empty
    // pool - while readiness of ours says no.
    rt().block_on(async {
        let mut c = client(&d.socket).await;
        for i in 0..2 {
            let r = c
                .add_network(integration::ipamd_proc::add_req(&format!("p{i}")))
                .await
                .unwrap()
                .into_inner();
            assert!(r.success);
        }
    });
    assert_eq!(run(&upstream).0, Some(0));
    let (code, err) = run(&[&addr, "-service", "rpc.CNIBackend"]);
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("NOT_SERVING"), "{err}");
    // Nobody listening: 2; bad arguments: 1; unknown service: 3 (NotFound).
    let gone = format!("-addr=unix://{}", dir.path().join("none.sock").display());
    assert_eq!(run(&[&gone, "-connect-timeout=1s"]).0, Some(2));
    assert_eq!(run(&["-connect-timeout=5s"]).0, Some(1));
    assert_eq!(run(&[&addr, "-tls"]).0, Some(1));
    assert_eq!(run(&[&addr, "-service=nope"]).0, Some(3));
}

enum Want {
    /// ipamd starts and took the value: `/v1/settings` shows it under the variable's name.
    Takes(serde_json::Value),
    /// ipamd starts with upstream's fallback, and says so (a warning naming the variable).
    FallsBack(serde_json::Value),
    /// ipamd refuses to start, naming the variable.
    Refused,
}

/// Every variable upstream's ipamd reads, set to something other than its default, through the
/// real binary: taken as upstream takes it, taken with upstream's fallback and said, or refused
/// with the variable named - never silently ignored. (What each value does is tested where the
/// behaviour lives: warm targets, SNAT, custom networking, ...; the entrypoint's and init's
/// variables are in `entrypoint_and_init_variables`.)
#[test]
fn every_upstream_ipamd_variable_is_taken_or_refused() {
    use Want::*;
    let cases: Vec<(&str, &str, Want)> = vec![
        (
            "ADDITIONAL_ENI_TAGS",
            r#"{"team":"net"}"#,
            Takes(json!({"team": "net"})),
        ),
        ("ADDITIONAL_ENI_TAGS", "team=net", FallsBack(json!({}))),
        ("ANNOTATE_POD_IP", "true", Takes(json!(true))),
        (
            "AWS_EC2_ENDPOINT",
            "http://127.0.0.1:1",
            Takes(json!("http://127.0.0.1:1")),
        ),
        (
            "AWS_EXTERNAL_SERVICE_CIDRS",
            "10.9.0.0/16",
            Takes(json!(["10.9.0.0/16"])),
        ),
        (
            "AWS_EXTERNAL_SERVICE_CIDRS",
            "10.9.0.0",
            FallsBack(json!(null)),
        ),
        (
            "AWS_MANAGE_ENIS_NON_SCHEDULABLE",
            "true",
            Takes(json!(true)),
        ),
        (
            "AWS_VPC_CNI_NODE_PORT_SUPPORT",
            "false",
            Takes(json!(false)),
        ),
        ("AWS_VPC_ENI_MTU", "1500", Takes(json!(1500))),
        ("AWS_VPC_ENI_MTU", "100", Refused),
        ("AWS_VPC_K8S_CNI_CONNMARK", "0x4000", Takes(json!(0x4000))),
        ("AWS_VPC_K8S_CNI_CONNMARK", "mark", FallsBack(json!(0x80))),
        (
            "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG",
            "true",
            Takes(json!(true)),
        ),
        (
            "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
            "172.16.0.0/12",
            Takes(json!(["172.16.0.0/12"])),
        ),
        ("AWS_VPC_K8S_CNI_EXTERNALSNAT", "true", Takes(json!(true))),
        (
            "AWS_VPC_K8S_CNI_EXTERNALSNAT",
            "yes",
            FallsBack(json!(false)),
        ),
        ("AWS_VPC_K8S_CNI_LOGLEVEL", "info", Takes(json!("info"))),
        (
            "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
            "hashrandom",
            Takes(json!(1)),
        ),
        ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "NONE", FallsBack(json!(2))),
        ("AWS_VPC_K8S_CNI_VETHPREFIX", "abc", Takes(json!("abc"))),
        ("AWS_VPC_K8S_CNI_VETHPREFIX", "vlan", Refused),
        (
            "CLUSTER_ENDPOINT",
            "https://127.0.0.1:6443",
            Takes(json!("https://127.0.0.1:6443")),
        ),
        ("CLUSTER_NAME", "prod", Takes(json!("prod"))),
        ("DISABLE_LEAKED_ENI_CLEANUP", "true", Takes(json!(true))),
        (
            "DISABLE_NETWORK_RESOURCE_PROVISIONING",
            "true",
            Takes(json!(true)),
        ),
        ("ENABLE_IMDS_ONLY_MODE", "true", Takes(json!(true))),
        // One family, as upstream: each alone contradicts the other's default.
        ("ENABLE_IPv4", "false", Refused),
        ("ENABLE_IPv6", "true", Refused),
        ("ENABLE_MULTI_NIC", "true", Refused),
        ("ENABLE_POD_ENI", "true", Refused),
        ("ENABLE_PREFIX_DELEGATION", "true", Refused), // with no warm target, as upstream
        ("ENABLE_SUBNET_DISCOVERY", "false", Takes(json!(false))),
        ("ENABLE_V4_EGRESS", "false", Takes(json!(false))),
        ("ENABLE_V6_EGRESS", "true", Takes(json!(true))),
        (
            "ENI_CONFIG_ANNOTATION_DEF",
            "example.com/cfg",
            Takes(json!("example.com/cfg")),
        ),
        (
            "ENI_CONFIG_LABEL_DEF",
            "topology.kubernetes.io/zone",
            Takes(json!("topology.kubernetes.io/zone")),
        ),
        ("HTTP_TIMEOUT", "30", Takes(json!(30))),
        ("HTTP_TIMEOUT", "5", FallsBack(json!(10))),
        ("IP_COOLDOWN_PERIOD", "5", Takes(json!(5))),
        ("IP_COOLDOWN_PERIOD", "-1", Refused),
        ("MANAGE_UNTAGGED_ENI", "false", Takes(json!(false))),
        ("MAX_ENI", "2", Takes(json!(2))),
        ("MAX_ENI", "two", FallsBack(json!(-1))),
        ("MINIMUM_IP_TARGET", "4", Takes(json!(4))),
        ("MY_NODE_NAME", "ip-10-0-1-10", Takes(json!("ip-10-0-1-10"))),
        ("MY_POD_NAME", "aws-node-x", Takes(json!("aws-node-x"))),
        (
            "NETWORK_POLICY_ENFORCING_MODE",
            "strict",
            Takes(json!("strict")),
        ),
        ("NETWORK_POLICY_ENFORCING_MODE", "audit", Refused),
        ("WARM_ENI_TARGET", "2", Takes(json!(2))),
        ("WARM_ENI_TARGET", "-1", FallsBack(json!(1))),
        ("WARM_IP_TARGET", "3", Takes(json!(3))),
        ("WARM_PREFIX_TARGET", "2", Takes(json!(2))),
        ("VPC_CNI_VERSION", "v1.23.1", Takes(json!("v1.23.1"))),
    ];
    let top = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (i, (var, val, want)) in cases.iter().enumerate() {
        let dir = top.path().join(i.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let intro = dir.join("introspect.sock");
        let bind = format!("unix:{}", intro.display());
        let env = [
            ("DISABLE_INTROSPECTION", "false"),
            ("INTROSPECTION_BIND_ADDRESS", bind.as_str()),
            // Custom networking needs it; its own row overrides it.
            ("MY_NODE_NAME", "node-a"),
            (var, val),
        ];
        if matches!(want, Refused) {
            let out = Ipamd::run_to_exit(&dir, None, &env, &[]);
            let err = String::from_utf8_lossy(&out.stderr);
            if out.status.code() != Some(2) || !err.contains(&format!("{var}=")) {
                failures.push(format!("{var}={val}: not refused by name: {err}"));
            }
            continue;
        }
        let mut d = Ipamd::standalone(&dir, None, "t3.medium", &enis(1, 3), &env);
        let out = Command::new("curl")
            .args(["-sf", "--unix-socket"])
            .arg(&intro)
            .arg("http://ipamd/v1/settings")
            .output()
            .unwrap();
        d.stop();
        if intro.exists() {
            failures.push(format!(
                "{var}={val}: {} left after ipamd stopped",
                intro.display()
            ));
        }
        let Ok(settings) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            failures.push(format!("{var}={val}: no /v1/settings on {bind}"));
            continue;
        };
        let said = settings["warnings"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w.as_str().unwrap_or("").starts_with(var)));
        let (expected, fallback) = match want {
            Takes(v) => (v, false),
            FallsBack(v) => (v, true),
            Refused => unreachable!(),
        };
        if &settings[*var] != expected || said != fallback {
            failures.push(format!(
                "{var}={val}: took {} (want {expected}), warned: {said}",
                settings[*var]
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The entrypoint's and the init container's variables, through `aws-vpc-cni conflist` (what
/// the entrypoint would write) and `aws-vpc-cni init` in a namespace of its own.
#[test]
fn entrypoint_and_init_variables() {
    let conflist = |env: &[(&str, &str)]| -> (Option<i32>, serde_json::Value, String) {
        let out = Command::new(integration::bin("aws-vpc-cni"))
            .arg("conflist")
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (
            out.status.code(),
            v,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, v, _) = conflist(&[]);
    assert_eq!(code, Some(0));
    assert_eq!(v["cniVersion"], "0.4.0", "as upstream ships it");
    let p = &v["plugins"][0];
    assert_eq!(
        (&p["mtu"], &p["vethPrefix"], &p["pluginLogLevel"]),
        (&json!("9001"), &json!("eni"), &json!("Debug"))
    );
    assert_eq!(v["plugins"].as_array().unwrap().len(), 2);
    let (_, v, _) = conflist(&[
        ("POD_MTU", "1500"),
        ("POD_SECURITY_GROUP_ENFORCING_MODE", "standard"),
        ("AWS_VPC_K8S_PLUGIN_LOG_FILE", "/tmp/p.log"),
        ("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "Fatal"),
        ("ENABLE_BANDWIDTH_PLUGIN", "true"),
        ("DISABLE_POD_V6", "true"),
    ]);
    let p = &v["plugins"][0];
    assert_eq!(p["mtu"], "1500");
    assert_eq!(p["podSGEnforcingMode"], "standard");
    assert_eq!(p["pluginLogFile"], "/tmp/p.log");
    assert_eq!(p["pluginLogLevel"], "Fatal");
    assert_eq!(v["plugins"][2]["type"], "bandwidth");
    assert_eq!(v["plugins"][3]["type"], "tuning");
    // Upstream refuses these at start; so do we, naming them.
    for (var, val) in [("POD_MTU", "100"), ("AWS_VPC_ENI_MTU", "20000")] {
        let (code, _, err) = conflist(&[(var, val)]);
        assert_eq!(code, Some(2), "{var}");
        assert!(err.contains(&format!("{var}=")), "{err}");
    }
    // Upstream checks this one only with pod ENIs on (refused here) and writes it as given.
    let (code, v, _) = conflist(&[("POD_SECURITY_GROUP_ENFORCING_MODE", "loose")]);
    assert_eq!(code, Some(0));
    assert_eq!(v["plugins"][0]["podSGEnforcingMode"], "loose");
    // A bad boolean is upstream's default, said.
    let (code, v, err) = conflist(&[("ENABLE_BANDWIDTH_PLUGIN", "yes")]);
    assert_eq!(code, Some(0));
    assert_eq!(v["plugins"].as_array().unwrap().len(), 2);
    assert!(err.contains("ENABLE_BANDWIDTH_PLUGIN="), "{err}");

    // init: tcp_early_demux written either way (it is per network namespace).
    let ns = Netns::new("dmx");
    let dir = tempfile::tempdir().unwrap();
    let demux = |program: &std::path::Path, args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(program)
            .args(args)
            .env("HOST_CNI_BIN_PATH", dir.path())
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = ns.exec(&["cat", "/proc/sys/net/ipv4/tcp_early_demux"]);
        String::from_utf8_lossy(&v.stdout).trim().to_string()
    };
    let bin = integration::bin("aws-vpc-cni");
    assert_eq!(
        demux(&bin, &["init"], &[("DISABLE_TCP_EARLY_DEMUX", "true")]),
        "0"
    );
    assert_eq!(demux(&bin, &["init"], &[]), "1");

    // Upstream's init image runs /init/aws-vpc-cni-init; ours under that name is init. And a
    // conflist template beside the binary (upstream's chart mounts its cniConfig there) is
    // the one rendered.
    // Hard links, not copies: a copy's write descriptor, inherited by a child another test
    // thread forks at that moment, makes the exec fail with ETXTBSY.
    let place = |to: &std::path::Path| {
        if std::fs::hard_link(&bin, to).is_err() {
            std::fs::copy(&bin, to).unwrap();
        }
    };
    let img = tempfile::tempdir().unwrap();
    let init = img.path().join("aws-vpc-cni-init");
    place(&init);
    ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_early_demux=0"]);
    assert_eq!(demux(&init, &[], &[]), "1");
    let app = img.path().join("aws-vpc-cni");
    place(&app);
    std::fs::write(
        img.path().join("10-aws.conflist"),
        r#"{"cniVersion":"0.3.1","name":"aws-cni","plugins":[{"name":"aws-cni","type":"aws-cni","vethPrefix":"__VETHPREFIX__","mtu":"__MTU__","pluginLogLevel":"__PLUGINLOGLEVEL__"}]}"#,
    )
    .unwrap();
    let out = Command::new(&app)
        .arg("conflist")
        .env_clear()
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cniVersion"], "0.3.1", "the mounted template");
    assert_eq!(v["plugins"][0]["mtu"], "9001");
    assert_eq!(v["plugins"].as_array().unwrap().len(), 1);
}

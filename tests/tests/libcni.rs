//! A real CNI client (libcni, as containerd and CRI-O use it) drives the conflist
//! `aws-cni` + Debian's `portmap` against the real ipamd, inside a node namespace.

use std::process::Command;

use integration::cni::CniClient;
use integration::ipamd_proc::{enis, Ipamd};
use integration::netns::Netns;
use integration::{ping_eventually, result_ip, sh, NODE_IP};
use serde_json::Value;

fn iptables_save(ns: &Netns) -> String {
    String::from_utf8_lossy(&ns.exec(&["iptables-save"]).stdout).into_owned()
}

#[test]
fn libcni_drives_aws_cni_and_portmap_with_real_ipamd() {
    let node = Netns::node("lcn");
    let dir = tempfile::tempdir().unwrap();
    let d = Ipamd::standalone(dir.path(), Some(&node.name), "t3.medium", &enis(2, 5), &[]);

    let c = CniClient::new(&node.name, dir.path(), &d.socket);

    let web = Netns::new("lcw");
    let cli = Netns::new("lcc");
    let ports = r#"[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]"#;
    let res: Value = serde_json::from_str(&c.ok("add", "cid-web", &web, "web", ports)).unwrap();
    let web_ip = result_ip(&res);
    let res2: Value = serde_json::from_str(&c.ok("add", "cid-cli", &cli, "cli", "")).unwrap();
    let cli_ip = result_ip(&res2);
    assert_ne!(web_ip, cli_ip);

    // The host veth's MAC was set at creation (udev's MACAddressPolicy leaves it alone), as
    // upstream does.
    let veth = cni_common::naming::host_veth_name("eni", "default", "web");
    let mac = cni_common::naming::host_veth_mac(&veth)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let sysfs = |f: &str| {
        String::from_utf8_lossy(
            &node
                .exec(&["cat", &format!("/sys/class/net/{veth}/{f}")])
                .stdout,
        )
        .trim()
        .to_string()
    };
    assert_eq!(sysfs("address"), mac);
    assert_eq!(sysfs("addr_assign_type"), "3", "NET_ADDR_SET");

    let rules = iptables_save(&node);
    assert!(rules.contains("CNI-HOSTPORT-DNAT"), "{rules}");
    assert!(
        rules.contains(&format!("--to-destination {web_ip}:80")),
        "{rules}"
    );

    // Pod to pod through the host, and the port mapping from the other pod.
    assert!(ping_eventually(&cli.name, &web_ip), "pod to pod");
    let mut server = Command::new("ip")
        .args(["netns", "exec", &web.name, "python3", "-c",
            "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',80));s.listen(1);c,a=s.accept();c.sendall(('hello '+a[0]).encode());c.close()"])
        .spawn()
        .unwrap();
    let mut got = String::new();
    for _ in 0..50 {
        let out = cli.exec(&["python3", "-c",
            &format!("import socket;s=socket.create_connection(('{NODE_IP}',8080),timeout=2);print(s.recv(100).decode())")]);
        if out.status.success() {
            got = String::from_utf8_lossy(&out.stdout).trim().to_string();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        got.starts_with("hello "),
        "port mapping 8080 -> {web_ip}:80 not reachable: {got:?}"
    );

    // CHECK through libcni. Debian's portmap 1.1.1 fails CHECK for any IPv4-only pod once
    // ip6tables works (it looks for an IPv6 DNAT chain it never made), so the chain's CHECK is
    // run on the aws-cni entry alone; libcni hands it the cached result of the whole chain.
    let checker = c.first_plugin_only(dir.path());
    checker.ok("check", "cid-web", &web, "web", ports);
    // And CHECK notices damage: the pod's default route removed.
    sh(&["ip", "-n", &web.name, "route", "del", "default"]);
    let out = checker.run("check", "cid-web", &web, "web", ports);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("default route"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.ok("del", "cid-web", &web, "web", ports);
    c.ok("del", "cid-cli", &cli, "cli", "");
    // DEL twice is fine.
    c.ok("del", "cid-cli", &cli, "cli", "");

    let rules = iptables_save(&node);
    assert!(
        !rules.contains(&format!("{web_ip}:80")),
        "portmap rules left: {rules}"
    );
    assert!(node.links().is_empty(), "links left: {:?}", node.links());
    assert!(node.rules().is_empty(), "rules left: {:?}", node.rules());
    assert!(web.links().is_empty() && cli.links().is_empty());
    let ck: Value = serde_json::from_slice(&std::fs::read(&d.checkpoint).unwrap()).unwrap();
    assert!(ck["allocations"].as_array().unwrap().is_empty(), "{ck}");
}

#[test]
fn pool_exhaustion_reaches_the_runtime_with_its_cause_and_leaves_nothing() {
    let node = Netns::node("lxn");
    let dir = tempfile::tempdir().unwrap();
    // One ENI with a single secondary address.
    let d = Ipamd::standalone(dir.path(), Some(&node.name), "t3.medium", &enis(1, 1), &[]);
    let c = CniClient::new(&node.name, dir.path(), &d.socket);
    let first = Netns::new("lx1");
    let second = Netns::new("lx2");
    c.ok("add", "cid-1", &first, "first", "");
    let out = c.run("add", "cid-2", &second, "second", "");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pool empty") && err.contains("t3.medium"),
        "runtime sees: {err}"
    );
    assert_eq!(
        node.links().len(),
        1,
        "only the first pod's veth: {:?}",
        node.links()
    );
    assert!(second.links().is_empty());
    assert_eq!(node.rules().len(), 1, "{:?}", node.rules());
    c.ok("del", "cid-2", &second, "second", "");
    c.ok("del", "cid-1", &first, "first", "");
    assert!(node.links().is_empty() && node.rules().is_empty());
}

#[test]
fn del_leaves_the_veth_to_ipamd_and_the_same_pod_can_come_back_at_once() {
    let node = Netns::node("lrn");
    let dir = tempfile::tempdir().unwrap();
    let d = Ipamd::standalone(dir.path(), Some(&node.name), "t3.medium", &enis(1, 5), &[]);
    let c = CniClient::new(&node.name, dir.path(), &d.socket);
    let pod = Netns::new("lrp");
    let first = result_ip(&serde_json::from_str(&c.ok("add", "cid-1", &pod, "web", "")).unwrap());
    c.ok("del", "cid-1", &pod, "web", "");
    // DEL did not wait for the kernel's veth teardown: the pair is down and renamed on both
    // sides, its routes and rules gone.
    let host_now = node.links_now();
    assert!(
        host_now.len() == 1 && host_now[0].starts_with(cni_common::naming::RETIRED_NAME_PREFIX),
        "host side after DEL: {host_now:?}"
    );
    assert!(node.rules().is_empty(), "rules left: {:?}", node.rules());
    let routes =
        String::from_utf8_lossy(&node.exec(&["ip", "route", "show", &first]).stdout).into_owned();
    assert!(routes.trim().is_empty(), "route to {first} left: {routes}");
    let pod_now = pod.links_now();
    assert!(
        !pod_now.iter().any(|l| l == "eth0"),
        "pod side kept its name: {pod_now:?}"
    );
    // The same pod into the same namespace, at once, then CHECK.
    let t = std::time::Instant::now();
    c.ok("add", "cid-2", &pod, "web", "");
    c.ok("check", "cid-2", &pod, "web", "");
    assert!(ping_eventually(&pod.name, NODE_IP));
    c.ok("del", "cid-2", &pod, "web", "");
    // ipamd deletes both retired pairs; `links()` fails the test if one is left after 15 s.
    assert!(node.links().is_empty(), "links left: {:?}", node.links());
    assert!(pod.links().is_empty(), "pod links left: {:?}", pod.links());
    assert!(t.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn the_reaper_reads_a_dump_of_hundreds_of_links_and_takes_only_the_retired_one() {
    // 400 veth pairs: ipamd's link dump spans many netlink datagrams. Among them one pair
    // retired long ago (the plugin's name and alias), which ipamd's reaper must find and delete,
    // and nothing else.
    let node = Netns::node("lrd");
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("links.batch");
    let mut lines: String = (0..400)
        .map(|i| format!("link add kv{i} type veth peer name kp{i}\n"))
        .collect();
    let retired = cni_common::naming::retired_name(999_999);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let alias = cni_common::naming::retired_alias(now - 3600, "cid-old/eth0");
    lines.push_str(&format!(
        "link add {retired} type veth peer name kpold\nlink set {retired} alias \"{alias}\"\n"
    ));
    std::fs::write(&batch, lines).unwrap();
    let out = node.exec(&["ip", "-batch", batch.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(node.links_now().len(), 802);

    let _d = Ipamd::standalone(dir.path(), Some(&node.name), "t3.medium", &enis(1, 5), &[]);
    // `links()` waits (up to 15 s) until no retired link is left.
    let left = node.links();
    assert_eq!(left.len(), 800, "{} links left", left.len());
    assert!(
        !left.iter().any(|l| l == "kpold"),
        "the retired pair's peer is left"
    );
    assert!((0..400).all(|i| left.contains(&format!("kv{i}")) && left.contains(&format!("kp{i}"))));
}

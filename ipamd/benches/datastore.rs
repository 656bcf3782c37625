//! Datastore micro-benchmark: one assign + one release, with 1, 10 and 1,000 other allocations
//! held, on a pool big enough never to run dry (cooldown 0 so released addresses come back).

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ipamd::pool::datastore::{Datastore, Eni, Key, PodMeta};

fn pool(held: usize) -> (Datastore, Vec<Key>) {
    let mut ds = Datastore::new(Duration::ZERO, 100_000);
    // 50 ENIs x 49 addresses: room for the held allocations and the churn.
    for e in 0..50u32 {
        let ips = (0..49u32)
            .map(|i| Ipv4Addr::from(0x0a00_0000 + (e << 8) + 10 + i))
            .collect();
        ds.add_eni(Eni {
            id: format!("eni-{e}"),
            device_number: e,
            primary: e == 0,
            mac: String::new(),
            subnet_cidr: "10.0.0.0/16".parse().unwrap(),
            subnet_id: String::new(),
            primary_ip: Ipv4Addr::from(0x0a00_0000 + (e << 8) + 5),
            ips,
            prefixes: vec![],
            primary_ipv6: None,
            ipv6_prefixes: vec![],
            attached_at: SystemTime::UNIX_EPOCH,
        })
        .expect("eni");
    }
    let now = SystemTime::now();
    let keys: Vec<Key> = (0..held)
        .map(|i| Key {
            network_name: "aws-cni".into(),
            container_id: format!("held-{i}"),
            ifname: "eth0".into(),
        })
        .collect();
    for k in &keys {
        ds.assign(k.clone(), PodMeta::default(), now)
            .expect("assign");
    }
    (ds, keys)
}

fn assign_release(c: &mut Criterion) {
    let mut g = c.benchmark_group("datastore_assign_release");
    g.throughput(Throughput::Elements(1));
    for held in [1usize, 10, 1000] {
        let (mut ds, _) = pool(held);
        let key = Key {
            network_name: "aws-cni".into(),
            container_id: "churn".into(),
            ifname: "eth0".into(),
        };
        let pod = PodMeta {
            namespace: "default".into(),
            name: "churn".into(),
            uid: String::new(),
        };
        g.bench_with_input(BenchmarkId::from_parameter(held), &held, |b, _| {
            b.iter(|| {
                let now = SystemTime::now();
                let a = ds.assign(key.clone(), pod.clone(), now).expect("assign");
                std::hint::black_box(a.ip);
                ds.release(&key, now);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, assign_release);
criterion_main!(benches);

//! ipamd: the node daemon that holds a pool of VPC addresses and hands them to `aws-cni`.
//!
//! - `pool`: the datastore, its checkpoint, the warm-pool planner, the pool manager that
//!   drives EC2, the ENI lifecycle and the sweeper (pure logic apart from side effects);
//! - `cloud`: EC2 and IMDS behind a trait (the SDK, the rate guard, an in-memory fake);
//! - `hostnet`: the node's networking (ENI links, route tables, rules, SNAT);
//! - `api`: the gRPC server the plugin talks to and the HTTP metrics/introspection ports;
//! - `instance`: instance-type limits, max pods and the standalone node file;
//! - `k8s`: the Kubernetes API (node and ENIConfig watches, Events, the pod IP annotation);
//! - `daemon` wires them together; `config`, `logging`, `metrics`, `supervise`, `rlimit` and
//!   `entrypoint` (the aws-vpc-cni binary's work) serve it.

pub mod api;
pub mod cidr;
pub mod cloud;
pub mod config;
pub mod daemon;
pub mod entrypoint;
pub mod hostnet;
pub mod instance;
pub mod k8s;
pub mod logging;
pub mod metrics;
pub mod pool;
pub mod probe;
pub mod rlimit;
pub mod supervise;

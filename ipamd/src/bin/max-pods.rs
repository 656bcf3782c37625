//! `max-pods`: offline equivalent of EKS's `max-pods-calculator.sh`, so node
//! bootstrap can size kubelet's `--max-pods` from the table compiled into
//! ipamd instead of calling the EC2 API.
//!
//! Arguments are parsed by hand to keep this tiny tool free of a CLI crate.

use std::io::{self, Write};
use std::process::ExitCode;

use ipamd::instance::maxpods::{max_pods, max_pods_uncapped, parse_cni_version, MaxPodsParams};
use ipamd::instance::types::{self as instance_types, InstanceLimits};

const USAGE: &str = "\
usage: max-pods (--instance-type TYPE | --all) [options]
Calculates the maxPods value to give kubelet for an EC2 instance type.

  --instance-type TYPE               instance type to calculate max pods for
  --all                              print '<type> <max pods>' for every known type,
                                     uncapped (as in eni-max-pods.txt)
  --cni-version VERSION              CNI version in use (e.g. 1.9.0); default: latest
  --cni-custom-networking-enabled    custom networking is on (primary ENI hosts no pods)
  --cni-prefix-delegation-enabled    prefix delegation is on (Nitro and CNI >= 1.9.0 only)
  --cni-max-eni N                    MAX_ENI setting: use at most N ENIs
  --show-max-allowed                 print the address capacity, not the kubelet
                                     recommendation (110, or 250 above 30 vCPUs)
  -h, --help                         print this help";

/// What the command line asks for.
#[derive(Debug)]
enum Command {
    Help,
    One(String, MaxPodsParams),
    All(MaxPodsParams),
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut instance_type = None;
    let mut all = false;
    let mut p = MaxPodsParams::default();
    while let Some(arg) = args.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg, None),
        };
        let takes_value = matches!(
            flag.as_str(),
            "--instance-type" | "--cni-version" | "--cni-max-eni"
        );
        if inline.is_some() && !takes_value {
            return Err(format!("{flag} takes no value"));
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--instance-type" => instance_type = Some(value()?),
            "--all" => all = true,
            "--cni-version" => {
                let v = value()?;
                if parse_cni_version(&v).is_none() {
                    return Err(format!("invalid --cni-version {v:?}"));
                }
                p.cni_version = Some(v);
            }
            "--cni-custom-networking-enabled" => p.custom_networking = true,
            "--cni-prefix-delegation-enabled" => p.prefix_delegation = true,
            "--cni-max-eni" => {
                let v = value()?;
                let n = v
                    .parse()
                    .map_err(|_| format!("invalid --cni-max-eni {v:?}"))?;
                p.max_eni = Some(n);
            }
            "--show-max-allowed" => p.show_max_allowed = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    match (instance_type, all) {
        (Some(t), false) => Ok(Command::One(t, p)),
        (None, true) => Ok(Command::All(p)),
        (Some(_), true) => Err("--instance-type and --all are exclusive".into()),
        (None, false) => Err("--instance-type or --all is required".into()),
    }
}

/// Prints the whole table in the layout of upstream's eni-max-pods.txt.
fn print_all(out: &mut impl Write, p: &MaxPodsParams) -> io::Result<()> {
    let prefixes = if p.prefix_delegation {
        " * 16 (prefix delegation, Nitro types)"
    } else {
        ""
    };
    writeln!(
        out,
        "# Mapping is calculated from the EC2 DescribeInstanceTypes data embedded"
    )?;
    writeln!(out, "# in ipamd, using the following formula:")?;
    writeln!(out, "# * only ENIs of the default network card are used")?;
    writeln!(out, "# * first IP on each ENI is not used for pods")?;
    writeln!(
        out,
        "# * +2 for the pods that use host-networking (AWS CNI and kube-proxy)"
    )?;
    writeln!(out, "#")?;
    writeln!(out, "#   # of ENI * (# of IPv4 per ENI - 1){prefixes} + 2")?;
    writeln!(out, "#")?;
    writeln!(
        out,
        "# Values are uncapped; kubelet's recommended limit is 110, or 250 above 30 vCPUs."
    )?;
    writeln!(
        out,
        "# cni-version: {}",
        p.cni_version.as_deref().unwrap_or("latest")
    )?;
    writeln!(out, "# custom-networking: {}", p.custom_networking)?;
    writeln!(out, "# prefix-delegation: {}", p.prefix_delegation)?;
    if let Some(n) = p.max_eni {
        writeln!(out, "# max-eni: {n}")?;
    }
    writeln!(out, "#")?;
    for (name, limits) in instance_types::all() {
        writeln!(out, "{name} {}", max_pods_uncapped(limits, p))?;
    }
    out.flush()
}

fn print_one(out: &mut impl Write, limits: &InstanceLimits, p: &MaxPodsParams) -> io::Result<()> {
    writeln!(out, "{}", max_pods(limits, p))?;
    out.flush()
}

fn main() -> ExitCode {
    let cmd = match parse_args(std::env::args().skip(1)) {
        Ok(cmd) => cmd,
        Err(msg) => {
            eprintln!("max-pods: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut out = io::BufWriter::new(io::stdout().lock());
    let written = match cmd {
        Command::Help => writeln!(out, "{USAGE}").and_then(|()| out.flush()),
        Command::All(p) => print_all(&mut out, &p),
        Command::One(ty, p) => match instance_types::lookup(&ty) {
            Some(limits) => print_one(&mut out, limits, &p),
            None => {
                eprintln!("max-pods: unknown instance type {ty:?}");
                return ExitCode::FAILURE;
            }
        },
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        // `max-pods --all | head` is normal use, not an error worth a message.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("max-pods: writing output: {e}");
            ExitCode::FAILURE
        }
    }
}

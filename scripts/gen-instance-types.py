#!/usr/bin/env python3
"""Regenerate ipamd/data/instance-types.tsv from two pinned, reviewable sources.

The ipamd crate embeds that TSV so the daemon and the `max-pods` tool know each
instance type's ENI and address limits without calling EC2 (and without python
at build time). The table merges:

  * scripts/data/upstream-vpc-limits.tsv: the per-type limits the reference
    CNI (aws/amazon-vpc-cni-k8s) publishes, i.e. the figures behind its
    misc/eni-max-pods.txt. For every type listed there, its ENI limit, IPv4
    limit, hypervisor and bare-metal flag are taken from this file, so that
    `max-pods --all` prints the same number as eni-max-pods.txt for each of
    those types. (Where the two sources disagree, e.g. moto describes
    i7ie.48xlarge with two network cards of 8 and 7 ENIs while the reference
    table has one card of 15, the reference figure wins; the generator lists
    every such override on stderr.)
  * moto's snapshot of DescribeInstanceTypes: vCPU counts, and every field of
    the types the reference table does not (yet) list.

vCPUs only decide kubelet's recommended cap in `max-pods` (110, or 250 above
30 vCPUs); `max-pods --all` and --show-max-allowed ignore them. For the few
types only the reference table knows (retired or never-listed types such as
p3.*, f1.*, g4ad.*, u-*tb1.metal), vcpus is derived, in this order:
  1. the size name: "<N>xlarge" and "metal-<N>xl" mean 4*N vCPUs ("xlarge" 4),
     EC2's naming rule, which holds for all but 19 of moto's ~1,300 such
     types (and moves only hpc7a.12xlarge across the 30-vCPU line);
  2. a plain ".metal" takes the largest vCPU count of its family in the table
     (c5a.metal -> c5a.24xlarge's 96, u-6tb1.metal -> u-6tb1.112xlarge's 448);
  3. otherwise UNKNOWN_VCPUS (1): the smaller kubelet cap. A too-low cap only
     leaves capacity unused; a too-high one could overload the node.
Derived counts are listed on stderr.

Usage (from anywhere):
    python3 -m venv .venv && .venv/bin/pip install 'moto[server]>=5,<6' boto3
    .venv/bin/python scripts/gen-instance-types.py [--out PATH]
When .venv exists, any other python re-executes the script under it.

Refreshing the reference figures from a checkout of amazon-vpc-cni-k8s (needs
no moto; rewrites scripts/data/upstream-vpc-limits.tsv, then rerun without
options):
    python3 scripts/gen-instance-types.py \\
        --import-upstream path/to/pkg/vpc/vpc_ip_resource_limit.go --upstream-ref v1.23.1
"""

import argparse
import gzip
import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "ipamd" / "data" / "instance-types.tsv"
UPSTREAM = REPO / "scripts" / "data" / "upstream-vpc-limits.tsv"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
COLUMNS = ["type", "max_enis", "ipv4_per_eni", "hypervisor", "bare_metal", "vcpus"]
UPSTREAM_COLUMNS = [
    "type",
    "eni_limit",
    "ipv4_limit",
    "default_card",
    "card_enis",
    "hypervisor",
    "bare_metal",
]
# See the docstring: vCPUs for a type no source describes and no rule covers.
UNKNOWN_VCPUS = 1


def use_repo_venv():
    """Re-exec under the repo's .venv so the output never depends on whichever
    moto happens to be installed in the caller's python."""
    in_venv = Path(sys.prefix).resolve() == (REPO / ".venv").resolve()
    if not in_venv and VENV_PYTHON.exists():
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), __file__, *sys.argv[1:]])


def load_moto_types():
    try:
        import moto
    except ImportError:
        sys.exit("moto is not installed; create the venv described in this script's docstring")
    resources = Path(moto.__file__).parent / "ec2" / "resources"
    # moto 5 ships it gzipped; older releases shipped plain JSON.
    for name, opener in (("instance_types.json.gz", gzip.open), ("instance_types.json", open)):
        path = resources / name
        if path.exists():
            with opener(path, "rt", encoding="utf-8") as f:
                return moto.__version__, json.load(f)
    sys.exit(f"no instance_types.json(.gz) under {resources}")


def moto_row(name, info):
    net = info["NetworkInfo"]
    # Pods only get addresses on ENIs of the default network card, so the
    # per-card limit matters, not the instance-wide total (they differ on
    # multi-card types such as c6in.32xlarge: 16 total, 8 per card).
    cards = net.get("NetworkCards") or []
    idx = net.get("DefaultNetworkCardIndex", 0)
    card = next((c for c in cards if c.get("NetworkCardIndex") == idx), None)
    enis = card["MaximumNetworkInterfaces"] if card else net["MaximumNetworkInterfaces"]
    hypervisor = info.get("Hypervisor") or ""  # absent on bare-metal types
    return [
        name,
        str(int(enis)),
        str(int(net["Ipv4AddressesPerInterface"])),
        hypervisor,
        "true" if info.get("BareMetal") else "false",
        str(int(info["VCpuInfo"]["DefaultVCpus"])),
    ]


# --- the reference CNI's figures ---------------------------------------------


def load_upstream(path=UPSTREAM):
    """Reads the reference table: (source label, {type: row dict})."""
    source = "?"
    rows = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if line.startswith("# source:"):
                source = line.split(":", 1)[1].strip()
                continue
            if not line or line.startswith("#"):
                continue
            fields = line.split("\t")
            if fields == UPSTREAM_COLUMNS:
                continue
            if len(fields) != len(UPSTREAM_COLUMNS):
                sys.exit(f"{path}:{lineno}: expected {len(UPSTREAM_COLUMNS)} fields")
            r = dict(zip(UPSTREAM_COLUMNS, fields))
            cards = [int(n) for n in r["card_enis"].split(",")]
            default = int(r["default_card"])
            enis = int(r["eni_limit"])
            # The published max-pods figure uses eni_limit; it must be the
            # default card's limit, which is what our table's max_enis means.
            if default >= len(cards) or cards[default] != enis:
                sys.exit(f"{path}:{lineno}: eni_limit {enis} is not card {default}'s {cards}")
            if r["hypervisor"] not in ("nitro", "xen", "unknown"):
                sys.exit(f"{path}:{lineno}: unexpected hypervisor {r['hypervisor']!r}")
            if r["bare_metal"] not in ("true", "false"):
                sys.exit(f"{path}:{lineno}: unexpected bare_metal {r['bare_metal']!r}")
            rows[r["type"]] = {
                "enis": enis,
                "ipv4": int(r["ipv4_limit"]),
                # Our table writes an unknown hypervisor as an empty field.
                "hypervisor": "" if r["hypervisor"] == "unknown" else r["hypervisor"],
                "bare_metal": r["bare_metal"],
            }
    return source, rows


def import_upstream(go_file, ref, out=UPSTREAM):
    """Extracts the per-type figures from the reference CNI's generated Go
    table into our TSV (figures only; nothing else of that file is kept)."""
    text = Path(go_file).read_text(encoding="utf-8")
    entry = re.compile(r'^\t"([^"]+)": \{\n(.*?)^\t\},$', re.S | re.M)

    def field(body, name):
        m = re.search(rf"\b{name}:\s*([^,\n]+),", body)
        if not m:
            raise ValueError(name)
        return m.group(1).strip().strip('"')

    rows = []
    for name, body in entry.findall(text):
        cards = re.findall(r"MaximumNetworkInterfaces:\s*(\d+),\s*NetworkCardIndex:\s*(\d+)", body)
        by_index = {int(i): int(n) for n, i in cards}
        if sorted(by_index) != list(range(len(by_index))):
            sys.exit(f"{name}: network card indexes are not 0..n-1: {sorted(by_index)}")
        rows.append(
            [
                name,
                field(body, "ENILimit"),
                field(body, "IPv4Limit"),
                field(body, "DefaultNetworkCardIndex"),
                ",".join(str(by_index[i]) for i in range(len(by_index))),
                field(body, "HypervisorType"),
                field(body, "IsBareMetal"),
            ]
        )
    if not rows:
        sys.exit(f"no instance types found in {go_file}")
    rows.sort()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.write(f"# source: amazon-vpc-cni-k8s {ref}, pkg/vpc/vpc_ip_resource_limit.go\n")
        f.write("# Per-type network limits as the reference CNI publishes them; its\n")
        f.write("# misc/eni-max-pods.txt is eni_limit * (ipv4_limit - 1) + 2 for each row.\n")
        f.write("# card_enis: ENI limit of each network card, by card index (comma-separated).\n")
        f.write("# Written by scripts/gen-instance-types.py --import-upstream; do not edit.\n")
        f.write("\t".join(UPSTREAM_COLUMNS) + "\n")
        for r in rows:
            f.write("\t".join(r) + "\n")
    print(f"wrote {len(rows)} instance types to {out}", file=sys.stderr)


# --- merging ------------------------------------------------------------------


def vcpus_from_size(name):
    """vCPUs implied by an "<N>xlarge" or "metal-<N>xl" size, else None."""
    size = name.split(".", 1)[1] if "." in name else ""
    m = re.fullmatch(r"(?:metal-)?(\d*)(?:xlarge|xl)", size)
    return 4 * int(m.group(1) or 1) if m else None


def derive_vcpus(name, rows):
    """vCPUs for a type moto does not describe; see the docstring."""
    n = vcpus_from_size(name)
    if n is not None:
        return n, "size name"
    family, _, size = name.partition(".")
    if size == "metal":
        siblings = [int(r[5]) for t, r in rows.items() if t.split(".", 1)[0] == family and t != name]
        if siblings:
            return max(siblings), "largest size of its family"
    return UNKNOWN_VCPUS, "unknown, smaller kubelet cap"


def merge(moto_types, upstream):
    rows = {name: moto_row(name, info) for name, info in moto_types.items()}
    overridden = []
    for name, u in upstream.items():
        new = [name, str(u["enis"]), str(u["ipv4"]), u["hypervisor"], u["bare_metal"]]
        old = rows.get(name)
        if old is None:
            rows[name] = new + [None]  # vcpus filled below, once all rows exist
            continue
        if old[1:5] != new[1:5]:
            overridden.append((name, old[1:5], new[1:5]))
        rows[name] = new + [old[5]]
    derived = []
    for name in sorted(rows):
        if rows[name][5] is None:
            n, why = derive_vcpus(name, {t: r for t, r in rows.items() if r[5] is not None})
            rows[name][5] = str(n)
            derived.append((name, n, why))
    return rows, overridden, derived


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"table to write (default {OUT})")
    ap.add_argument("--import-upstream", metavar="GO_FILE", help="refresh the reference TSV from this file")
    ap.add_argument("--upstream-ref", default="(unknown version)", help="version label for --import-upstream")
    args = ap.parse_args()
    if args.import_upstream:
        import_upstream(args.import_upstream, args.upstream_ref)
        return

    use_repo_venv()
    version, types = load_moto_types()
    if isinstance(types, list):  # tolerate the raw API shape as well as moto's dict
        types = {t["InstanceType"]: t for t in types}
    source, upstream = load_upstream()
    rows, overridden, derived = merge(types, upstream)

    for name, old, new in overridden:
        print(f"{name}: moto {old} replaced by reference {new}", file=sys.stderr)
    for name, n, why in derived:
        print(f"{name}: not in moto; vcpus {n} ({why})", file=sys.stderr)
    moto_only = sorted(set(types) - set(upstream))
    if moto_only:
        print(f"kept {len(moto_only)} types only moto knows: {' '.join(moto_only)}", file=sys.stderr)

    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.write(
            f"# Generated by scripts/gen-instance-types.py from moto {version} and"
            f" {source} limits; do not edit.\n"
        )
        f.write("\t".join(COLUMNS) + "\n")
        for name in sorted(rows):
            f.write("\t".join(rows[name]) + "\n")
    shown = out.relative_to(REPO) if out.resolve().is_relative_to(REPO) else out
    print(f"wrote {len(rows)} instance types to {shown}", file=sys.stderr)


if __name__ == "__main__":
    main()

# Two images from one build, laid out where upstream's DaemonSet looks for things:
#   aws-node, the default (last) stage:   docker build -t amazon-k8s-cni .
#     /app: aws-vpc-cni (ENTRYPOINT), ipamd, aws-cni, egress-cni, max-pods, the conflist template, the chained
#     plugins (portmap, loopback, bandwidth, tuning, host-local) and grpc-health-probe, a link to
#     aws-vpc-cni, which answers as upstream's health probe when run under that name.
#   init:                                 docker build --target init -t amazon-k8s-cni-init .
#     /init: aws-vpc-cni-init (aws-vpc-cni again; under this name it does the init container's
#     work: installs the plugins found beside it, sets the sysctls) and the chained plugins. It is
#     the default command, since an init container written for upstream's init image names none.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ipamd --bins \
    && cp "$(scripts/build-plugin.sh)" target/release/aws-cni \
    && cp "$(scripts/build-plugin.sh egress-cni)" target/release/egress-cni

FROM debian:bookworm-slim AS plugins
RUN apt-get update && apt-get install -y --no-install-recommends containernetworking-plugins \
    && rm -rf /var/lib/apt/lists/*

FROM debian:bookworm-slim AS init
WORKDIR /init
COPY --from=build /src/target/release/aws-vpc-cni /init/aws-vpc-cni-init
COPY --from=plugins /usr/lib/cni/portmap /usr/lib/cni/loopback /usr/lib/cni/bandwidth \
     /usr/lib/cni/tuning /usr/lib/cni/host-local /init/
CMD ["/init/aws-vpc-cni-init"]

FROM debian:bookworm-slim AS aws-node
# iptables for SNAT/connmark (iptables-restore), nftables to take over upstream's connmark
# table, iproute2 for operators debugging on the node.
RUN apt-get update && apt-get install -y --no-install-recommends iptables nftables iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=build /src/target/release/aws-vpc-cni /src/target/release/ipamd \
     /src/target/release/aws-cni /src/target/release/egress-cni /src/target/release/max-pods /app/
COPY --from=plugins /usr/lib/cni/portmap /usr/lib/cni/loopback /usr/lib/cni/bandwidth \
     /usr/lib/cni/tuning /usr/lib/cni/host-local /app/
COPY config/10-aws.conflist /app/10-aws.conflist
RUN ln -s aws-vpc-cni /app/grpc-health-probe
ENTRYPOINT ["/app/aws-vpc-cni"]

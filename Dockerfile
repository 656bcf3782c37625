# The aws-node image: aws-vpc-cni (entrypoint), ipamd, aws-cni, max-pods and the chained
# plugins (portmap, loopback, bandwidth, host-local) in /app. Build: docker build -t aws-node .
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ipamd --bins \
    && cp "$(scripts/build-plugin.sh)" target/release/aws-cni

FROM debian:bookworm-slim AS plugins
RUN apt-get update && apt-get install -y --no-install-recommends containernetworking-plugins \
    && rm -rf /var/lib/apt/lists/*

FROM debian:bookworm-slim
# iptables for SNAT/connmark (iptables-restore), iproute2 for operators debugging on the node.
RUN apt-get update && apt-get install -y --no-install-recommends iptables iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=build /src/target/release/aws-vpc-cni /src/target/release/ipamd \
     /src/target/release/aws-cni /src/target/release/max-pods /app/
COPY --from=plugins /usr/lib/cni/portmap /usr/lib/cni/loopback /usr/lib/cni/bandwidth \
     /usr/lib/cni/host-local /app/
COPY config/10-aws.conflist /app/10-aws.conflist
ENTRYPOINT ["/app/aws-vpc-cni"]

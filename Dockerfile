# cni-agent node image: the Python agent plus the static Go shim it installs onto the host.
# Build: docker build -t cni-agent:dev .

FROM golang:1.22-bookworm AS shim
WORKDIR /src/plugin
COPY plugin/ ./
RUN CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o /out/ambient-cni . && go vet ./...

FROM debian:12-slim
# Debian's python3 (its dist-packages carry python3-nftables, the libnftables binding) and the
# kernel tools the agent drives: iptables (legacy + nft), nftables, ipset, iproute2.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-nftables libnftables1 iptables nftables ipset iproute2 conntrack ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/cni-agent
COPY requirements.lock pyproject.toml README.md ./
COPY cni_agent/ ./cni_agent/
RUN python3 -m venv /opt/cni-agent/venv \
 && /opt/cni-agent/venv/bin/pip install --no-cache-dir -r requirements.lock \
 && /opt/cni-agent/venv/bin/pip install --no-cache-dir --no-deps . \
 && ln -s /usr/lib/python3/dist-packages/nftables \
      "$(/opt/cni-agent/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nftables"
COPY --from=shim /out/ambient-cni /opt/cni-agent/bin/ambient-cni
ENV PATH=/opt/cni-agent/venv/bin:$PATH
ENTRYPOINT ["cni-agent"]
CMD ["run"]

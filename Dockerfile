# syntax=docker/dockerfile:1
# callrouter image: the builder compiles the pjsua2 engine with the same script as
# `make` (scripts/build-engine.sh); the runtime image carries only Python, the wheel
# and the engine module, and runs as an unprivileged user.

FROM debian:bookworm-slim AS builder
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -q && apt-get install -y -q --no-install-recommends \
        build-essential pkg-config swig libssl-dev uuid-dev dpkg-dev patch ca-certificates \
        libsrtp2-dev xz-utils debian-archive-keyring \
        python3 python3-dev python3-venv python3-distutils \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The engine layer depends only on the build script and engine config: cached across code changes.
COPY scripts/build-engine.sh scripts/
COPY scripts/engine/ scripts/engine/
RUN python3 -m venv /opt/callrouter \
    && PYTHON=/opt/callrouter/bin/python CALLROUTER_ENGINE_CACHE=/tmp/engine \
       bash scripts/build-engine.sh --install \
       "$(/opt/callrouter/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
COPY pyproject.toml README.md ./
COPY src/ src/
RUN /opt/callrouter/bin/pip install --no-cache-dir . \
    && /opt/callrouter/bin/callrouter engine-info

FROM debian:bookworm-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="callrouter" \
      org.opencontainers.image.description="Inbound SIP call router for AI assistants" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="GPL-2.0-only" \
      org.opencontainers.image.source.pjproject="pjproject 2.17 (GPLv2) from Debian sid's asterisk source package (orig-Xpjproject)"
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -q && apt-get install -y -q --no-install-recommends \
        python3 libssl3 libuuid1 libsrtp2-1 curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/callrouter --create-home callrouter
COPY --from=builder /opt/callrouter /opt/callrouter
COPY config/callrouter.toml /etc/callrouter/callrouter.toml
ENV PATH=/opt/callrouter/bin:$PATH \
    CALLROUTER_DATA_DIR=/var/lib/callrouter \
    CALLROUTER_HTTP_LISTEN=0.0.0.0:8080 \
    CALLROUTER_SIP_LISTEN=0.0.0.0:5060 \
    CALLROUTER_RTP_PORTS=20000-29999 \
    CALLROUTER_LOG_FORMAT=json
USER callrouter
WORKDIR /var/lib/callrouter
VOLUME ["/var/lib/callrouter"]
EXPOSE 5060/udp 5060/tcp 8080/tcp 20000-29999/udp
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/api/v1/health || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["callrouter"]
CMD ["serve", "--config", "/etc/callrouter/callrouter.toml"]

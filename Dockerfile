# syntax=docker/dockerfile:1
# The switchboard image: a release build of the `switchboard` binary on
# Debian's slim base, run as a non-root user, nothing else in it.
#
#   docker build -t switchboard:dev .
#   docker run --rm -p 3000:3000 switchboard:dev            # embedded dev mode
#   docker run --rm switchboard:dev migrate                 # with DATABASE_URL=…
#
# The entrypoint is the binary, so Kubernetes args are its subcommands
# (`serve --no-migrate`, `migrate`; k8s/base). The HEALTHCHECK is the
# binary's own `healthcheck` subcommand: the slim base has no curl or wget,
# and it speaks TLS when TLS_CERT_FILE is set.

ARG RUST_VERSION=1.94
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------- build
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
# The whole workspace (see .dockerignore): cargo reads every member's
# manifest, and the server embeds clients/dashboard and clients/js.
COPY . .
# Cache mounts keep the registry and incremental build between image builds;
# the binary is copied out of the cached target dir in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin switchboard \
    && install -D -m 0755 target/release/switchboard /out/switchboard

# ---------------------------------------------------------------- runtime
FROM debian:${DEBIAN_RELEASE}-slim
# ca-certificates: TLS to PostgreSQL, Redis or SYNC_URL with public CAs.
# Unpinned on purpose: it should follow the release's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 switchboard \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /var/lib/switchboard --shell /usr/sbin/nologin switchboard \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/switchboard
COPY --from=build /out/switchboard /usr/local/bin/switchboard
# The uid/gid the Kubernetes manifests run as (runAsUser 10001). The working
# directory is the one writable place, for the default SQLite file of a
# quick `docker run`; production points DATABASE_URL at PostgreSQL.
USER 10001:10001
WORKDIR /var/lib/switchboard
ENV SWITCHBOARD_LISTEN=0.0.0.0:3000
EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["switchboard", "healthcheck"]
ENTRYPOINT ["switchboard"]
CMD ["serve"]

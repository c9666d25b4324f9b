# The stack's other services, for where no registry serves theirs (deploy/docker/build.sh builds them on the
# local Debian base; elsewhere use the public images named in deploy/compose/compose.yaml's comments, or these on
# debian:bookworm-slim). Build context: the folder build.sh stages (kafka.sh, its entrypoint, the Kafka jars).
ARG BASE=debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251

# Kafka (KRaft, one node) on Debian's Java 17, run by the project's own kafka.sh
FROM ${BASE} AS kafka
# openjdk's postinst links its man pages: the folder must exist in a minimal base
RUN mkdir -p /usr/share/man/man1 && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps \
    && rm -rf /var/lib/apt/lists/* /usr/share/doc/* \
    && useradd --system --uid 10002 --home-dir /var/lib/kafka --create-home --shell /usr/sbin/nologin kafka
COPY libs /opt/slidr-kafka/cache/kafka-4.1.1/libs
COPY kafka.sh kafka-entrypoint.sh /opt/slidr-kafka/
ENV SLIDR_HOME=/var/lib/kafka SLIDR_CACHE_DIR=/opt/slidr-kafka/cache SLIDR_KAFKA_VERSION=4.1.1 \
    SLIDR_KAFKA_PORT=19092 SLIDR_KAFKA_CONTROLLER_PORT=19093
USER 10002
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
    CMD bash -c 'exec 3<>/dev/tcp/127.0.0.1/$SLIDR_KAFKA_PORT && grep -q "Kafka Server started" $SLIDR_HOME/kafka/logs/server.log'
ENTRYPOINT ["bash", "/opt/slidr-kafka/kafka-entrypoint.sh"]

# redis-server from Debian's packages (the profile cache: no persistence)
FROM ${BASE} AS redis
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* /usr/share/doc/*
ENV REDIS_PORT=16379
USER redis
HEALTHCHECK --interval=5s --timeout=5s --retries=3 CMD redis-cli -p "$REDIS_PORT" ping | grep -q PONG
ENTRYPOINT ["sh", "-c", "exec redis-server --port \"$REDIS_PORT\" --bind 127.0.0.1 --save '' --appendonly no \"$@\"", "redis"]

# Prometheus from Debian's packages (config mounted at /etc/prometheus/prometheus.yml)
FROM ${BASE} AS prometheus
RUN apt-get update && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/prometheus/consoles* \
    && mkdir /prometheus && chown prometheus /prometheus  # a new named volume there takes this owner
USER prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", \
     "--web.listen-address=127.0.0.1:9090"]

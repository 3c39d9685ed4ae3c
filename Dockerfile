# gitcache: a slim image with git and zstd that runs `gitcache serve`.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends git zstd \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home-dir /var/lib/gitcache --create-home gitcache

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gitcache ./gitcache
RUN pip install --no-cache-dir .

USER gitcache
ENV GITCACHE_SERVER_LISTEN=0.0.0.0:8080 \
    GITCACHE_SERVER_STATE_DIR=/var/lib/gitcache
VOLUME ["/var/lib/gitcache"]
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

# Mount a config at /etc/gitcache/gitcache.toml and set GITCACHE_CONFIG to use your own;
# without one the embedded default serves github.com, gitlab.com and bitbucket.org.
ENTRYPOINT ["gitcache"]
CMD ["serve"]

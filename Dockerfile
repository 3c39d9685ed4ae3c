# gitcache: a slim image with git and zstd that runs `gitcache serve` under tini.
#
# Base: Python 3.11 on Debian 12 (bookworm), which brings git 2.39 and zstd 1.5.4 (gitcache
# needs git 2.37 or later). The tag names the exact Python and Debian release; pin it by
# digest too (FROM python:3.11.7-slim-bookworm@sha256:…) where your builds must be
# reproducible to the byte.
FROM python:3.11.7-slim-bookworm

# tini is PID 1: it forwards SIGTERM to gitcache (which then drains and shuts down) and
# reaps any git helper whose parent exited before it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git zstd tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/gitcache --create-home gitcache

WORKDIR /app
# Dependencies first, in a layer of their own: a change to gitcache's source does not
# reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY README.md LICENSE ./
COPY gitcache ./gitcache
RUN pip install --no-cache-dir --no-deps .

# The image's settings live in a config file, not in ENV: an environment variable would
# silently override the same key of a config you mount. Mount yours over this file (or set
# GITCACHE_CONFIG to another path); it must set listen and state_dir itself.
COPY deploy/container.toml /etc/gitcache/gitcache.toml
ENV GITCACHE_CONFIG=/etc/gitcache/gitcache.toml

# State (mirrors, cache, spools) lives in /var/lib/gitcache, owned by uid 10001: a bind
# mount must be writable by that uid (chown 10001 DIR), or run with --user of its owner.
USER gitcache
VOLUME ["/var/lib/gitcache"]
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--", "gitcache"]
CMD ["serve"]

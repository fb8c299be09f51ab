# mde-monitor application image: worker, beat and the CLI (`docker compose run --rm worker <cmd>`).
# Pinned base (bump deliberately); dependencies installed within constraints.txt (the lock file).
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MDE_MONITOR_CONFIG=/app/config/monitor.yaml

WORKDIR /app

# the package first (better layer caching), then the shipped rule pack and example config
COPY pyproject.toml setup.py constraints.txt README.md ./
COPY monitor ./monitor
COPY alerts ./alerts
COPY config/monitor.example.yaml ./config/monitor.example.yaml
RUN pip install --no-compile -c constraints.txt . \
    && groupadd --gid 10001 mde \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin mde \
    && mkdir -p /app/.data \
    && chown 10001:10001 /app/.data

USER 10001:10001
ENTRYPOINT ["mde-monitor"]
CMD ["--help"]

# mde-monitor application image: worker, beat and the CLI (`docker compose run --rm worker <cmd>`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MDE_MONITOR_CONFIG=/app/config/monitor.yaml

WORKDIR /app

# the package first (better layer caching), then the shipped rule pack and example config
COPY pyproject.toml README.md ./
COPY monitor ./monitor
RUN pip install . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin mde \
    && mkdir -p /app/.data \
    && chown mde:mde /app/.data

COPY alerts ./alerts
COPY config/monitor.example.yaml ./config/monitor.example.yaml

USER mde
ENTRYPOINT ["mde-monitor"]
CMD ["--help"]

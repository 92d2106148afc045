# The service image: one image, the process chosen by the command (consume, aggregate, serve).
# Not built on the development machines of this project (no Docker engine there).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY metering ./metering
COPY consumers ./consumers
COPY aggregator ./aggregator
RUN pip install --no-cache-dir .
USER 65534:65534
ENTRYPOINT ["metering"]
CMD ["--help"]

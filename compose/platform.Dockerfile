# The one image for every service that runs this repository's code: the migration and document-spec
# one-shots and the Airflow components. Its Python environment is exactly uv.lock (Airflow 3.3 and
# its providers, dbt, the platform's dependencies), so it matches what the tests run. The package is
# installed editable from /opt/stripe-platform/src, where docker-compose.yml mounts the repository:
# edits to dags/ and src/ apply without a rebuild; a rebuild is needed only when uv.lock changes.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_LINK_MODE=copy \
    PATH=/opt/venv/bin:$PATH

RUN pip install --no-cache-dir uv

WORKDIR /opt/stripe-platform
# Dependencies first (cached until uv.lock changes), then the package itself.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY src ./src
RUN uv sync --frozen --no-dev

CMD ["stripe-platform", "--help"]

# The fraud model's training image (deploy/k8s/training-job.yaml; Airflow's KubernetesPodOperator on
# the prod profile). Built from the repository root:
#   docker build -f deploy/training.Dockerfile -t stripe-platform-training:$(git rev-parse --short HEAD) .
# Its Python environment is uv.lock's core dependencies plus the `ml` group only (no Airflow, no
# dbt): the entry point python -m stripe_platform.orchestration.ml imports neither
# (tests/test_k8s.py checks it). The package is installed editable from /opt/stripe-platform, so
# the repository files it reads at run time (dbt_project/seeds: the EUR rates; mongo/: the document
# validators) sit where it looks for them.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PATH=/opt/venv/bin:$PATH

# libgomp1: LightGBM's OpenMP runtime, which the slim image lacks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir "uv>=0.9,<1" \
    && groupadd --gid 10001 platform \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin platform

WORKDIR /opt/stripe-platform
# Dependencies first (cached until uv.lock changes), then the package and what it reads.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-default-groups --group ml --no-install-project
COPY src ./src
COPY mongo ./mongo
COPY dbt_project/seeds ./dbt_project/seeds
RUN uv sync --frozen --no-default-groups --group ml

USER 10001:10001
CMD ["python", "-m", "stripe_platform.orchestration.ml", "--help"]

# syntax=docker/dockerfile:1
#
# MLflow tracking server for the ssod stack. The official image
# (ghcr.io/mlflow/mlflow) has no PostgreSQL driver, so `mlflow server
# --backend-store-uri postgresql://...` fails there with "No module named
# 'psycopg2'". This image pins the MLflow version the package uses (3.17.x) and adds
# psycopg2-binary. The compose file supplies the `mlflow server ...` command.
#
#   docker build -f docker/mlflow.Dockerfile -t ssod-mlflow:3.17 .
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG MLFLOW_VERSION=3.17.2

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary>=2.9,<3" \
 && python -c "import mlflow, psycopg2; print('mlflow', mlflow.__version__, 'psycopg2', psycopg2.__version__)" \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin mlflow \
 && mkdir -p /mlartifacts \
 && chown mlflow:mlflow /mlartifacts

# /mlartifacts is a named volume in the compose file; it inherits this ownership.
WORKDIR /home/mlflow
USER mlflow
EXPOSE 5000

CMD ["mlflow", "server", "--help"]

-- Run once by the postgres image's entrypoint, as POSTGRES_USER, when the data volume
-- is first initialised (files in /docker-entrypoint-initdb.d are skipped afterwards).
--
-- MLflow and Optuna both keep their schema version in Alembic's `alembic_version`
-- table, so they must never share a database: each gets its own, owned by
-- POSTGRES_USER (the role running this script).
--
-- CREATE DATABASE cannot run inside a transaction or take IF NOT EXISTS, so each
-- statement is generated only when the database is missing and executed with psql's
-- \gexec; re-running this file by hand is harmless:
--   docker compose exec postgres sh -c 'psql -U "$POSTGRES_USER" -d postgres -f /docker-entrypoint-initdb.d/01-databases.sql'

SELECT 'CREATE DATABASE mlflow'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\gexec

SELECT 'CREATE DATABASE optuna'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'optuna')\gexec

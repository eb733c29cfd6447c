#!/usr/bin/env bash
# Submit the example training job to a Ray cluster through the Jobs API.
#
#   RAY_ADDRESS=http://127.0.0.1:8265 STORAGE=s3://my-bucket/ray-ckpt cluster/submit.sh --steps 40
#
# RAY_ADDRESS  the cluster's dashboard / job server (default http://127.0.0.1:8265)
# STORAGE      checkpoint storage URI; shared storage (S3) on multi-node clusters (default ./job_runs,
#              which is only meaningful on a single-node cluster)
# RUN_NAME     run name (default: job-<timestamp>); re-using one resumes that run
# JOB_PYTHON   the interpreter on the cluster that runs the job (default: python)
# SUBMIT_ARGS  extra `ray job submit` options, e.g. "--no-wait" or "--runtime-env-json '{...}'"
# Remaining arguments go to cluster/train_job.py (--steps, --workers, --evaluators, --config).
#
# The repository is uploaded as the job's working dir (minus .git, .venv, run outputs), so the
# cluster only needs ray, torch and ray-ckpt's dependencies installed (see cluster/cluster.yaml).
# With token authentication on the cluster, export RAY_AUTH_MODE=token and make the cluster's
# token available (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
STORAGE="${STORAGE:-./job_runs}"
RUN_NAME="${RUN_NAME:-job-$(date +%Y%m%d-%H%M%S)}"
RAY="${RAY:-ray}"
JOB_PYTHON="${JOB_PYTHON:-python}"

RUNTIME_ENV='{"excludes": [".git", ".venv", "**/__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "demo_runs", "job_runs", "*.egg-info"]}'

# shellcheck disable=SC2086  # SUBMIT_ARGS is split on purpose
exec "$RAY" job submit \
    --address "$ADDRESS" \
    --working-dir "$REPO" \
    --runtime-env-json "$RUNTIME_ENV" \
    ${SUBMIT_ARGS:-} \
    -- "$JOB_PYTHON" cluster/train_job.py --storage "$STORAGE" --run-name "$RUN_NAME" "$@"

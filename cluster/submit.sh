#!/usr/bin/env bash
# Submit the example training job to a Ray cluster through the Jobs API.
#
#   RAY_ADDRESS=http://127.0.0.1:8265 STORAGE=s3://my-bucket/ray-ckpt cluster/submit.sh --steps 40
#
# RAY_ADDRESS  the cluster's dashboard / job server (default http://127.0.0.1:8265)
# STORAGE      checkpoint storage URI; shared storage (S3) on multi-node clusters. A local path is
#              made absolute here (the job runs in Ray's temporary copy of this repository, where a
#              relative path would land); default <repo>/job_runs, for a head on this machine
# RUN_NAME     run name (default: job-<timestamp>); re-using one resumes that run
# JOB_PYTHON   the interpreter on the cluster that runs the job (default: this repository's
#              .venv/bin/python when the cluster is on this machine and .venv exists, else python)
# RAY          the ray CLI (default: this repository's .venv/bin/ray if present, else ray on PATH)
# SUBMIT_ARGS  extra `ray job submit` options, e.g. "--no-wait" or "--runtime-env-json '{...}'"
# Remaining arguments go to cluster/train_job.py (--steps, --workers, --evaluators, --config).
#
# The repository is uploaded as the job's working dir (minus .git, .venv, run outputs), so the
# cluster only needs ray, torch and ray-ckpt's dependencies installed (see cluster/cluster.yaml).
# Token authentication: when RAY_AUTH_MODE is unset and a token is available (RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), RAY_AUTH_MODE=token is set for the job CLI, as
# `ray start` itself does when it finds a token. Set RAY_AUTH_MODE=disabled to opt out.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
RUN_NAME="${RUN_NAME:-job-$(date +%Y%m%d-%H%M%S)}"

if [[ -z "${RAY:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/ray" ]]; then
        RAY="$REPO/.venv/bin/ray"
    elif command -v ray >/dev/null 2>&1; then
        RAY="ray"
    else
        echo "submit.sh: no ray CLI: run scripts/setup.sh (creates .venv) or set RAY=/path/to/ray" >&2
        exit 2
    fi
fi

# the cluster on this machine (loopback or this host's name/address): it can run this checkout's venv
host="${ADDRESS#*://}"
host="${host%%:*}"
local_cluster=0
case "$host" in
    127.*|localhost|"$(hostname)"|"$(hostname -f 2>/dev/null || hostname)") local_cluster=1 ;;
    *) for ip in $(hostname -I 2>/dev/null || true); do [[ "$ip" == "$host" ]] && local_cluster=1; done ;;
esac
if [[ -z "${JOB_PYTHON:-}" ]]; then
    if [[ "$local_cluster" == 1 && -x "$REPO/.venv/bin/python" ]]; then
        JOB_PYTHON="$REPO/.venv/bin/python"
    else
        JOB_PYTHON="python"
    fi
fi

STORAGE="${STORAGE:-$REPO/job_runs}"
if [[ "$STORAGE" != *://* && "$STORAGE" != /* ]]; then
    STORAGE="$(pwd)/${STORAGE#./}"
fi

if [[ -z "${RAY_AUTH_MODE:-}" ]]; then
    if [[ -n "${RAY_AUTH_TOKEN:-}" || ( -n "${RAY_AUTH_TOKEN_PATH:-}" && -f "${RAY_AUTH_TOKEN_PATH}" ) \
          || -f "$HOME/.ray/auth_token" ]]; then
        export RAY_AUTH_MODE=token
    fi
fi

RUNTIME_ENV='{"excludes": [".git", ".venv", "**/__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "demo_runs", "job_runs", "*.egg-info"]}'

echo "submit.sh: job to $ADDRESS: run $RUN_NAME on $STORAGE (python: $JOB_PYTHON)" >&2
# shellcheck disable=SC2086  # SUBMIT_ARGS is split on purpose
exec "$RAY" job submit \
    --address "$ADDRESS" \
    --working-dir "$REPO" \
    --runtime-env-json "$RUNTIME_ENV" \
    ${SUBMIT_ARGS:-} \
    -- "$JOB_PYTHON" cluster/train_job.py --storage "$STORAGE" --run-name "$RUN_NAME" "$@"

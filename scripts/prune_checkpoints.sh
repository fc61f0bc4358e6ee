#!/usr/bin/env bash
# Keep only the newest N checkpoints (default 1) of every run in a runs directory:
#
#   scripts/prune_checkpoints.sh [--keep N] [--dry-run] [RUNS_DIR]     (RUNS_DIR defaults to runs)
#
# The script itself ships with the package, shared/prune_checkpoints.sh (what `ilsvrc-canon prune` runs); this
# path, the one the README documents from a checkout, runs that one copy.
PRUNE_PROG="${PRUNE_PROG:-scripts/prune_checkpoints.sh}" exec bash "$(dirname "${BASH_SOURCE[0]}")/../shared/prune_checkpoints.sh" "$@"

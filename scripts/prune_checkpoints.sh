#!/usr/bin/env bash
# Keep only the newest N checkpoints (default 1) of every run in a runs directory.
#
#   scripts/prune_checkpoints.sh [--keep N] [--dry-run] [RUNS_DIR]     (RUNS_DIR defaults to runs)
#
# Checkpoints are RUNS_DIR/<model>/<version>/checkpoints/epoch-NNNN.keras; the newest is the run's last
# and is never removed. The script refuses any folder that is not a runs root (one the run store made,
# marked by .runs_root), never follows links, and prints every file it removes and the bytes freed.
set -euo pipefail

keep=1
dry_run=0
runs_dir=""
usage="usage: scripts/prune_checkpoints.sh [--keep N] [--dry-run] [RUNS_DIR]"

while [ $# -gt 0 ]; do
  case "$1" in
    --keep) [ $# -ge 2 ] || { echo "error: --keep needs a number; $usage" >&2; exit 2; }
            keep="$2"; shift 2 ;;
    --keep=*) keep="${1#--keep=}"; shift ;;
    --dry-run|-n) dry_run=1; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "error: unknown option $1; $usage" >&2; exit 2 ;;
    *) [ -z "$runs_dir" ] || { echo "error: one RUNS_DIR only; $usage" >&2; exit 2; }
       runs_dir="$1"; shift ;;
  esac
done
runs_dir="${runs_dir:-runs}"

if ! [[ "$keep" =~ ^[0-9]+$ ]] || [ "$keep" -lt 1 ]; then
  echo "error: --keep must be a whole number of at least 1 (the last checkpoint is always kept), got '$keep'" >&2
  exit 2
fi
if [ ! -d "$runs_dir" ] || [ -L "$runs_dir" ]; then
  echo "error: $runs_dir is not a directory; give the runs directory (default: runs)" >&2
  exit 2
fi
if [ ! -f "$runs_dir/.runs_root" ]; then
  echo "error: refusing to prune $runs_dir: it is not a runs directory (no .runs_root marker, which the run store writes)" >&2
  exit 2
fi
root=$(cd "$runs_dir" && pwd -P)

freed=0
removed=0
verb="removed"
[ "$dry_run" -eq 1 ] && verb="would remove"
# One checkpoints/ folder per run, exactly two levels below the root: <model>/<version>/checkpoints.
while IFS= read -r -d '' checkpoint_dir; do
  mapfile -d '' files < <(find "$checkpoint_dir" -maxdepth 1 -type f -name 'epoch-*.keras' -print0 | sort -z)
  count=${#files[@]}
  [ "$count" -gt "$keep" ] || continue
  for ((i = 0; i < count - keep; i++)); do
    file="${files[$i]}"
    case "$(cd "$(dirname "$file")" && pwd -P)/" in
      "$root"/*) ;;
      *) echo "error: $file resolves outside $root; not touching it" >&2; exit 2 ;;
    esac
    size=$(stat -c %s "$file")
    [ "$dry_run" -eq 1 ] || rm -f -- "$file"
    echo "$verb $file ($size bytes)"
    freed=$((freed + size))
    removed=$((removed + 1))
  done
done < <(find "$root" -mindepth 3 -maxdepth 3 -type d -name checkpoints -path "$root/*/v*/checkpoints" -print0 | sort -z)

if [ "$dry_run" -eq 1 ]; then
  echo "dry run: would free $freed bytes from $removed checkpoint(s) in $runs_dir (keeping the newest $keep per run)"
else
  echo "freed $freed bytes from $removed checkpoint(s) in $runs_dir (kept the newest $keep per run)"
fi

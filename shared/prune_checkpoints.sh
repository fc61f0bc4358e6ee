#!/usr/bin/env bash
# Keep only the newest N checkpoints (default 1) of every run in a runs directory.
#
#   ilsvrc-canon prune [--keep N] [--dry-run] [RUNS_DIR]               (RUNS_DIR defaults to runs)
#   scripts/prune_checkpoints.sh [--keep N] [--dry-run] [RUNS_DIR]     (the same, from a checkout)
#
# This file ships inside the package (shared/, as package data) so the installed console command runs it;
# scripts/prune_checkpoints.sh only calls it. PRUNE_PROG is the command name usage messages show.
#
# Checkpoints are RUNS_DIR/<model>/<version>/checkpoints/epoch-NNNN.keras; the newest by epoch number (epoch-10000
# is newer than epoch-9999) is the run's last and is never removed. The script refuses any folder that is not a
# runs root (one the run store made, marked by .runs_root), never follows links, and prints every file it
# removes and the bytes freed.
# A run that a live process trains (its run.lock is held, see shared/runs.py) is skipped with one line;
# the run's lock is held shared while its files are removed, so a resume cannot start in the middle.
# Any error (a find, stat or rm that fails) stops the script with a non-zero status.
set -euo pipefail

keep=1
dry_run=0
runs_dir=""
usage="usage: ${PRUNE_PROG:-prune_checkpoints.sh} [--keep N] [--dry-run] [RUNS_DIR]"

die() { echo "error: $*" >&2; exit 1; }

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

# Decimal whatever the leading zeros (bash arithmetic reads 08 as bad octal), and small enough not to overflow.
digits="$keep"
while [[ "$digits" == 0?* ]]; do digits="${digits#0}"; done
if ! [[ "$digits" =~ ^[0-9]{1,9}$ ]] || [ "$((10#$digits))" -lt 1 ]; then
  echo "error: --keep must be a whole number of at least 1 (the last checkpoint is always kept) and at most 999999999, got '$keep'" >&2
  exit 2
fi
keep=$((10#$digits))
if [ ! -d "$runs_dir" ] || [ -L "$runs_dir" ]; then
  echo "error: $runs_dir is not a directory; give the runs directory (default: runs)" >&2
  exit 2
fi
if [ ! -f "$runs_dir/.runs_root" ]; then
  echo "error: refusing to prune $runs_dir: it is not a runs directory (no .runs_root marker, which the run store writes)" >&2
  exit 2
fi
command -v flock >/dev/null || die "flock (util-linux) is needed to tell runs still training; install util-linux"
root=$(cd "$runs_dir" && pwd -P)

# find's NUL-separated names, sorted, into the array named by $1. Through a temporary file, not a process
# substitution, whose failure would go unnoticed.
listing=$(mktemp) || die "cannot create a temporary file"
trap 'rm -f "$listing"' EXIT
list_sorted() {
  local -n into="$1"
  shift
  find "$@" -print0 >"$listing" || die "could not list $1 (find failed)"
  sort -z -o "$listing" "$listing" || die "could not sort the listing of $1"
  mapfile -d '' into <"$listing"
}

# The epoch checkpoints of the checkpoints/ folder $2, oldest first, into the array named by $1: sorted by epoch
# number (epoch-10000 after epoch-9999), not as text; files not named epoch-N.keras are not checkpoints.
list_checkpoints() {
  local -n found="$1"
  local name
  found=()
  find "$2" -maxdepth 1 -type f -name 'epoch-*.keras' -printf '%f\0' >"$listing" || die "could not list $2 (find failed)"
  sort -z -t- -k2,2n -o "$listing" "$listing" || die "could not sort the listing of $2"
  while IFS= read -r -d '' name; do
    if [[ "$name" =~ ^epoch-[0-9]+\.keras$ ]]; then
      found+=("$2/$name")
    fi
  done <"$listing"
}

# A live run's lock record in one line: "pid N on HOST since T" (from run.lock's JSON).
holder() {
  local record pid host since
  record=$(head -c 4096 "$1" 2>/dev/null | tr -d '\n') || true
  [[ "$record" =~ \"pid\":\ *([0-9]+) ]] && pid="${BASH_REMATCH[1]}" || pid="?"
  [[ "$record" =~ \"host\":\ *\"([^\"]*)\" ]] && host="${BASH_REMATCH[1]}" || host="?"
  [[ "$record" =~ \"started\":\ *\"([^\"]*)\" ]] && since="${BASH_REMATCH[1]}" || since="?"
  echo "pid $pid on $host since $since"
}

freed=0
removed=0
skipped=0
verb="removed"
[ "$dry_run" -eq 1 ] && verb="would remove"
# One checkpoints/ folder per run, exactly two levels below the root: <model>/<version>/checkpoints.
checkpoint_dirs=()
list_sorted checkpoint_dirs "$root" -mindepth 3 -maxdepth 3 -type d -name checkpoints -path "$root/*/v*/checkpoints"
for checkpoint_dir in "${checkpoint_dirs[@]}"; do
  run_dir="${checkpoint_dir%/checkpoints}"
  lock_fd=""
  if [ -f "$run_dir/run.lock" ]; then
    exec {lock_fd}<"$run_dir/run.lock" || die "cannot open $run_dir/run.lock"
    status=0
    flock -n -s -E 75 "$lock_fd" || status=$?
    if [ "$status" -eq 75 ]; then
      echo "skipped $run_dir: in use by $(holder "$run_dir/run.lock"); prune it after it ends" >&2
      exec {lock_fd}<&-
      skipped=$((skipped + 1))
      continue
    fi
    [ "$status" -eq 0 ] || die "cannot lock $run_dir/run.lock (flock exit status $status)"
  fi
  files=()
  list_checkpoints files "$checkpoint_dir"
  count=${#files[@]}
  for ((i = 0; i < count - keep; i++)); do
    file="${files[$i]}"
    case "$(cd "$(dirname "$file")" && pwd -P)/" in
      "$root"/*) ;;
      *) echo "error: $file resolves outside $root; not touching it" >&2; exit 2 ;;
    esac
    size=$(stat -c %s -- "$file") || die "cannot read the size of $file"
    if [ "$dry_run" -eq 0 ]; then
      rm -- "$file" || die "could not remove $file"
    fi
    echo "$verb $file ($size bytes)"
    freed=$((freed + size))
    removed=$((removed + 1))
  done
  [ -z "$lock_fd" ] || exec {lock_fd}<&-
done

note=""
[ "$skipped" -eq 0 ] || note="; skipped $skipped run(s) still training"
if [ "$dry_run" -eq 1 ]; then
  echo "dry run: would free $freed bytes from $removed checkpoint(s) in $runs_dir (keeping the newest $keep per run)$note"
else
  echo "freed $freed bytes from $removed checkpoint(s) in $runs_dir (kept the newest $keep per run)$note"
fi

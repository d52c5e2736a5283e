# Shell helpers sourced by multinode.sh and slurm_phase.sbatch (not run on its own).

# Quote one word the way Python's shlex.quote does, so printed commands read alike and paste back.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\"\'\"\'}"; fi
}

# One command as a shell line.
command_line() {
  local word line=""
  for word in "$@"; do line+="${line:+ }$(quote "$word")"; done
  echo "$line"
}

# Print (DRY_RUN=1) or run one command; the printed lines form a runnable script.
run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then command_line "$@"; else "$@"; fi
}

#!/usr/bin/env bash
# Installs what tests/scale needs, Debian's slurm-wlm and munge, unless they are there (run by `make test-scale`).
#
#   bash tests/scale/install_slurm.sh
#
# Needs root (CI's container is). Where it cannot install them, it says why and the SLURM tests skip with that
# reason; nothing is started here: the tests start and stop their own munged, slurmctld and slurmd.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1 || [[ -x /usr/sbin/$1 ]]; }
if have slurmctld && have slurmd && have munged && have sbatch; then exit 0; fi
if [[ $(id -u) != 0 ]]; then
  echo "install_slurm.sh: slurm-wlm and munge are missing and this is not root; the SLURM tests will skip" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm.sh: no apt-get here; install slurm-wlm (22.05+) and munge yourself" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || echo "install_slurm.sh: apt-get update failed; trying the cached package lists" >&2
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
  || echo "install_slurm.sh: apt-get install slurm-wlm munge failed; the SLURM tests will skip" >&2

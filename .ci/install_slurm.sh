#!/usr/bin/env bash
# Install what the Slurm tests need from Debian's packages: slurmctld, slurmd, the Slurm client
# commands, munge (Slurm's authentication) and shellcheck. tests/test_slurm.py writes its own
# slurm.conf and starts the daemons; this only installs them. Does nothing when everything is
# already there. Needs root and apt-get.
set -euo pipefail

missing=()
for binary in slurmctld slurmd sbatch munged shellcheck; do
    command -v "$binary" >/dev/null || missing+=("$binary")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "install_slurm: missing ${missing[*]}, and installing them needs root and apt-get" >&2
    exit 1
fi
echo "install_slurm: missing ${missing[*]}; installing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq slurmctld slurmd slurm-client munge shellcheck >/dev/null

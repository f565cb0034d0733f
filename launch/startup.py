"""The startup script of a run: given to the queued resource as metadata, run by every worker as
root on every boot (a rebuilt or restarted node included).

On each boot it (1) fetches the pinned source tarball (checked against its sha256) and unpacks it,
unless that revision is already there; (2) installs the requirements once per requirements hash;
(3) starts the trainer with the run's exact arguments through launch/worker.sh, unless the run is
already active on this worker (worker.sh refuses a second start) or finished with exit code 0.
Boots are serialised with flock, so two at once start one trainer. Output goes to the boot log
(logs/boot.log) and the system journal. MAXGEMMA_HOME (default /opt/maxgemma) moves the install,
for tests. Stdlib only.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from launch.gcloud_argv import REMOTE_HOME, Settings, requirements_hash, start_argv

TEMPLATE = r"""#!/bin/bash
# maxgemma startup script for run {run} of {name} (made by python -m launch.tpu; see docs/tpu.md)
set -u
export HOME=${{HOME:-/root}}
home=${{MAXGEMMA_HOME:-{remote_home}}}
source_uri={source_uri}
source_sha256={source_sha256}
stamp=.venv/.maxgemma-setup-{req_hash}
mkdir -p "$home/logs" && cd "$home" || exit 1
exec >> logs/boot.log 2>&1
say() {{ echo "$(date -u +%FT%TZ) $(hostname) maxgemma-boot: $*"; }}
exec 9> logs/boot.lock
flock 9
say "boot of run {run}: source ${{source_sha256:0:16}}"
if [ "$(cat .source-sha256 2>/dev/null)" != "$source_sha256" ]; then
  case $source_uri in
    gs://*) gcloud storage cp "$source_uri" src.tar.gz.part ;;
    *) cp "$source_uri" src.tar.gz.part ;;
  esac || {{ say "cannot fetch $source_uri"; exit 1; }}
  if ! echo "$source_sha256  src.tar.gz.part" | sha256sum -c --status; then
    say "$source_uri does not have sha256 $source_sha256: not installing it"; exit 1
  fi
  tar -xzf src.tar.gz.part -C . && mv src.tar.gz.part src.tar.gz || exit 1
  echo "$source_sha256" > .source-sha256
  say "source unpacked"
fi
if [ ! -f "$stamp" ]; then
  uv=$(command -v uv || echo "$HOME/.local/bin/uv")
  [ -x "$uv" ] || curl -LsSf https://astral.sh/uv/install.sh | sh || exit 1
  "$uv" venv --allow-existing --python {python} .venv || exit 1
  "$uv" pip install --python .venv/bin/python -r requirements.txt 'jax[tpu]' || exit 1
  "$uv" pip install --python .venv/bin/python --no-deps -e . || exit 1
  touch "$stamp"
  say "requirements installed"
fi
if [ "$(cat logs/{run}.exit 2>/dev/null)" = 0 ]; then
  say "run {run} finished with exit code 0 on this worker: not starting it again"; exit 0
fi
{start} 9>&-
rc=$?
if [ $rc = 3 ]; then say "run {run} is already active here: no second trainer"; exit 0; fi
exit $rc
"""


def startup_script(s: Settings, trainer_args: Sequence[str], source_uri: str,
                   source_sha256: str) -> str:
  """The bash text of the run's startup script."""
  return TEMPLATE.format(
      run=s.run_name, name=s.name, remote_home=REMOTE_HOME, source_uri=shlex.quote(source_uri),
      source_sha256=shlex.quote(source_sha256), req_hash=requirements_hash(s),
      python=shlex.quote(s.python), start=shlex.join(start_argv(s, trainer_args)))

# Sourced by the GPU check scripts: the repository root, $OUT, the source tree importable without
# an install, the wheels a lent machine lacks (.gpuwheels/, pip download --no-deps), `section`.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/mfumon-gpu}
mkdir -p "$OUT"
[ -e mfumon/integrations ] || ln -s ../integrations mfumon/integrations  # source tree without install
export PYTHONPATH=$PWD
if [ -d .gpuwheels ]; then
  python -m pip install -q --no-index --no-deps --find-links .gpuwheels .gpuwheels/*.whl 2>&1 | tail -2
fi
section() { echo; echo "=== $1 ($(date +%T))"; }

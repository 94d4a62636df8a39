# Sourced by scripts/worker and scripts/test: make ./.venv with the project installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
fi
# Cheap when nothing changed; picks up new dependencies when pyproject.toml did. The versions are
# requirements.lock's: the ones the tests passed on (regenerate it as its header says).
"$VENV/bin/pip" install --quiet --disable-pip-version-check -c "$ROOT/requirements.lock" \
    -e "$ROOT[$EXTRAS]"

#!/usr/bin/env bash
# Executes every notebook headless on the evcxr Rust kernel; a cell that fails fails the run.
# Installs what is missing: evcxr_jupyter (pinned, `cargo install --locked`, ~7 minutes on
# 2 cores) and nbconvert in a virtualenv. CI runs it; so can you.
#
#   notebooks/run.sh            execute into a temporary folder (the committed files untouched)
#   notebooks/run.sh --inplace  execute and save the outputs into the notebooks (to commit)
set -euo pipefail
cd "$(dirname "$0")"
EVCXR_VERSION=0.22.0
export PATH="$HOME/.cargo/bin:$PATH"

if ! cargo install --list | grep -q "^evcxr_jupyter v$EVCXR_VERSION:"; then
    cargo install --locked evcxr_jupyter --version "$EVCXR_VERSION"
fi
venv="${NOTEBOOK_VENV:-$HOME/.cache/attn-notebooks-venv}"
if [ ! -x "$venv/bin/jupyter-nbconvert" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r requirements.txt
fi
evcxr_jupyter --install > /dev/null
# Compiled dependencies are cached between notebooks (.evcxr/init.evcxr: `:cache`).
export EVCXR_CONFIG_DIR="$PWD/.evcxr"

if [ "${1:-}" = "--inplace" ]; then where=(--inplace); else where=(--output-dir "$(mktemp -d)"); fi
for nb in [0-9]*.ipynb; do
    start=$(date +%s)
    "$venv/bin/jupyter" nbconvert --to notebook --execute "${where[@]}" \
        --ExecutePreprocessor.timeout=900 --ExecutePreprocessor.kernel_name=rust "$nb" 2> "/tmp/nbconvert-$nb.log" ||
        { cat "/tmp/nbconvert-$nb.log" >&2; echo "$nb: a cell failed" >&2; exit 1; }
    echo "$nb: executed in $(( $(date +%s) - start )) s"
done

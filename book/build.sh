#!/usr/bin/env bash
# Builds the book: the step-through widget (crates/attn-widget, the CPU FlashAttention-2 for
# wasm32, bound to the page's script by wasm-bindgen) into book/src/widget/pkg, then mdBook.
# Needs the wasm32-unknown-unknown target and wasm-bindgen-cli of the version in Cargo.lock;
# `--install` adds both (what CI does on a clean machine).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

# The CLI must match the wasm-bindgen crate the widget links, to the patch version.
wb_version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
if [[ ${1:-} == --install ]]; then
    rustup target add wasm32-unknown-unknown
    if ! wasm-bindgen --version 2>/dev/null | grep -q " $wb_version\$"; then
        cargo install wasm-bindgen-cli --version "$wb_version"
    fi
fi
if ! wasm-bindgen --version 2>/dev/null | grep -q " $wb_version\$"; then
    echo "book/build.sh: wasm-bindgen-cli $wb_version is needed (bash book/build.sh --install adds it)" >&2
    exit 1
fi

cargo build --release -p attn-widget --target wasm32-unknown-unknown
rm -rf book/src/widget/pkg
wasm-bindgen --target web --no-typescript --out-dir book/src/widget/pkg \
    target/wasm32-unknown-unknown/release/attn_widget.wasm
mdbook build book

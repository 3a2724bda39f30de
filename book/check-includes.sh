#!/usr/bin/env bash
# Every {{#include path:anchor}} in the book must name a file that has that anchor, so no
# listing silently renders empty.
set -euo pipefail
cd "$(dirname "$0")/src"
status=0
while IFS= read -r line; do
    file=${line%%:*}
    spec=$(sed -E 's/.*\{\{#include ([^}]*)\}\}.*/\1/' <<<"${line#*:}")
    path=${spec%%:*}
    anchor=${spec#"$path"}
    anchor=${anchor#:}
    if [[ ! -f $path ]]; then
        echo "$file: includes missing file $path" >&2
        status=1
    elif [[ -n $anchor && ! $anchor =~ ^[0-9] ]] && ! grep -q "ANCHOR: $anchor\$" "$path"; then
        echo "$file: $path has no anchor '$anchor'" >&2
        status=1
    fi
done < <(grep -o '{{#include [^}]*}}' -r --include='*.md' . | sed 's/^\.\///')
exit $status

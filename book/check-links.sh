#!/usr/bin/env bash
# Every relative link and image in the book's markdown must point at a file that exists
# (offline: external http(s) links are not fetched). mdBook itself reports missing chapters
# and includes; this catches a broken link to a chapter, a plot or a data file.
set -euo pipefail
cd "$(dirname "$0")/src"
status=0
while IFS= read -r hit; do
    file=${hit%%:*}
    target=${hit#*:}
    target=${target#*](}
    target=${target%)}
    target=${target%%#*}
    [[ -z $target || $target =~ ^(https?|mailto): ]] && continue
    if [[ ! -e "$(dirname "$file")/$target" ]]; then
        echo "$file: broken link or image: $target" >&2
        status=1
    fi
done < <(grep -o '\]([^)]*)' -r --include='*.md' . | sed 's/^\.\///')
exit $status

#!/bin/sh
# mokutil_listing.sh: a stand-in for mokutil that prints, for --list-enrolled, the file "listing"
# next to it (the enrolled keys a test chose) and fails for anything else.
[ "$1" = --list-enrolled ] || exit 1
exec cat "$(dirname "$0")/listing"

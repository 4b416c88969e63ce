#!/usr/bin/env bash
# Build the Debian package postgresql-15-task-events from this tree (debian/,
# pg_buildext), check what it contains, install it, run the regression suites
# against the installed package (debian/tests/installcheck, the autopkgtest),
# and purge it again, so that later suites' `make install` stands alone.
# Run as root: it installs Debian packages.  Exits 77 (skip) where there is no
# dpkg/apt-get.  The build runs in a copy of the tree in a temporary
# directory: nothing is written to the tree itself.
#
# Environment:
#   TE_PKG_EXTRACT_TO=DIR  instead of apt-get install/purge, extract the .deb
#                          with dpkg -x into DIR, the root of a private
#                          relocated PostgreSQL copy (DIR/usr/lib/postgresql/15
#                          /bin/pg_config must exist), run the same check with
#                          that copy's binaries, then remove the extracted files
#   TE_PKG_KEEP=1          keep the temporary directory (the .deb, build.log)
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
PG_MAJOR=15
PACKAGE=postgresql-$PG_MAJOR-task-events
EXTRACT_TO=${TE_PKG_EXTRACT_TO:-}
SKIP=77

# What building the package needs (debian/control's Build-Depends, and the
# compiler); dpkg-checkbuilddeps below says if this list falls behind.
BUILD_PACKAGES=(
	build-essential
	debhelper
	dpkg-dev
	postgresql-server-dev-all # pg_buildext, PGXS and the headers of every supported version
	uuid-dev
	libcurl4-openssl-dev
	libssl-dev
)

if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
	echo "package.sh: no dpkg/apt-get here, the Debian package cannot be built: skipped"
	exit "$SKIP"
fi
if [[ $EUID -ne 0 ]]; then
	echo "package.sh: must run as root (it installs Debian packages)" >&2
	exit 1
fi
if [[ -n $EXTRACT_TO && ! -x $EXTRACT_TO/usr/lib/postgresql/$PG_MAJOR/bin/pg_config ]]; then
	echo "package.sh: TE_PKG_EXTRACT_TO=$EXTRACT_TO is not a PostgreSQL $PG_MAJOR copy" \
		"(no $EXTRACT_TO/usr/lib/postgresql/$PG_MAJOR/bin/pg_config)" >&2
	exit 1
fi

# True when dpkg knows the package as fully installed.
is_installed() {
	[[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

missing=()
for pkg in "${BUILD_PACKAGES[@]}"; do
	is_installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]} > 0)); then
	echo "package.sh: installing ${missing[*]}"
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
else
	echo "package.sh: all ${#BUILD_PACKAGES[@]} build packages already installed"
fi

WORK=$(mktemp -d /tmp/task_events_pkg.XXXXXX)
# apt-get reads the .deb as the user _apt.
chmod 755 "$WORK"
SRC=$WORK/task-events
INSTALLED=0
EXTRACTED=()
FAILED=1
cleanup() {
	local f i
	if ((INSTALLED)); then
		echo "package.sh: purging $PACKAGE"
		DEBIAN_FRONTEND=noninteractive apt-get purge -y "$PACKAGE" || FAILED=1
	fi
	# The extract mode's "purge": remove the files the .deb put into the copy,
	# then the directories this left empty (deepest first).
	for f in "${EXTRACTED[@]}"; do
		[[ -d $f ]] || rm -f -- "$f"
	done
	for ((i = ${#EXTRACTED[@]} - 1; i >= 0; i--)); do
		if [[ -d ${EXTRACTED[i]} ]]; then
			rmdir --ignore-fail-on-non-empty -- "${EXTRACTED[i]}"
		fi
	done
	if ((FAILED == 0)) && [[ ${TE_PKG_KEEP:-0} != 1 ]]; then
		rm -rf -- "$WORK"
	else
		echo "package.sh: files kept in $WORK"
	fi
}
trap cleanup EXIT

# The tree without VCS data or anything git ignores (build products of earlier
# runs); dpkg-buildpackage cleans it first anyway.
mkdir -p -- "$SRC"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
	files=()
	while IFS= read -r -d '' f; do
		# Deleted but not yet committed files are still listed.
		if [[ -e $ROOT/$f ]]; then
			files+=("$f")
		fi
	done < <(git -C "$ROOT" ls-files -z --cached --others --exclude-standard)
	tar -C "$ROOT" -cf - -- "${files[@]}" | tar -C "$SRC" -xf -
else
	tar -C "$ROOT" --exclude-vcs -cf - . | tar -C "$SRC" -xf -
fi

(cd -- "$SRC" && dpkg-checkbuilddeps)

echo "package.sh: dpkg-buildpackage -us -uc -b in $SRC (log: $WORK/build.log)"
if ! (cd -- "$SRC" && dpkg-buildpackage -us -uc -b) >"$WORK/build.log" 2>&1; then
	tail -n 80 -- "$WORK/build.log"
	echo "package.sh: the package build failed" >&2
	exit 1
fi

shopt -s nullglob
debs=("$WORK/${PACKAGE}_"*.deb)
shopt -u nullglob
if ((${#debs[@]} != 1)); then
	echo "package.sh: expected one ${PACKAGE}_*.deb in $WORK, found ${#debs[@]}" >&2
	exit 1
fi
DEB=${debs[0]}
dpkg-deb --info "$DEB"

# The package holds the library, the control file, every install and upgrade
# script of the tree and task_events_consume; nothing from the tests.
contents=$(dpkg-deb --contents "$DEB" | awk '{ print $6 }' | sed 's|^\./|/|')
echo "$contents"
libdir=/usr/lib/postgresql/$PG_MAJOR
extdir=/usr/share/postgresql/$PG_MAJOR/extension
expected=("$libdir/lib/task_events.so" "$extdir/task_events.control" "$libdir/bin/task_events_consume")
for script in "$ROOT"/task_events--*.sql; do
	expected+=("$extdir/${script##*/}")
done
bad=0
for f in "${expected[@]}"; do
	if ! grep -qxF -- "$f" <<<"$contents"; then
		echo "package.sh: $f is missing from the package" >&2
		bad=1
	fi
done
mapfile -t scripts < <(grep -E '^/usr/share/postgresql/[0-9]+/extension/task_events--' <<<"$contents" || true)
for f in "${scripts[@]}"; do
	if [[ ! -f $ROOT/${f##*/} ]]; then
		echo "package.sh: the package has $f, which the tree does not" >&2
		bad=1
	fi
done
if grep -E '/(sql|expected|test|tmp_check|results)/|regress|\.spec$|\.pl$' <<<"$contents"; then
	echo "package.sh: the package contains test files (above)" >&2
	bad=1
fi
((bad == 0))

if [[ -n $EXTRACT_TO ]]; then
	echo "package.sh: extracting $DEB into $EXTRACT_TO"
	mapfile -t paths <<<"$contents"
	for f in "${paths[@]}"; do
		EXTRACTED+=("$EXTRACT_TO$f")
	done
	dpkg-deb -x "$DEB" "$EXTRACT_TO"
	TE_PG_BIN=$EXTRACT_TO$libdir/bin bash "$SRC/debian/tests/installcheck"
else
	INSTALLED=1
	(cd -- "$WORK" && DEBIAN_FRONTEND=noninteractive apt-get install -y "./${DEB##*/}")
	is_installed "$PACKAGE"
	bash "$SRC/debian/tests/installcheck"
fi
FAILED=0

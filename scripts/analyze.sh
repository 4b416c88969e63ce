#!/usr/bin/env bash
# Static analysis of task_events' C code: cppcheck and clang-tidy over
# src/*.c and consumer/*.c (task_events_consume).  Prints every finding as file:line: [check] message and exits
# non-zero when there is any (exit 1), or when a tool could not run (exit 2).
#
#   scripts/analyze.sh            both tools
#   scripts/analyze.sh cppcheck   one of them
#   scripts/analyze.sh clang-tidy
#
# Needs cppcheck, clang-tidy and PostgreSQL 15's server headers; as root it
# installs the missing Debian packages.  Builds nothing and writes nothing in
# the tree: the compilation database (compile_commands.json) is made in a
# temporary directory from the compiler commands PGXS would run
# (make -n -B), with the gcc-only flags clang does not know removed.
#
# cppcheck: --enable=warning,performance,portability, with the include path
# of the PostgreSQL headers so that their macros (PG_FUNCTION_ARGS,
# ereport, PG_TRY) are understood.  Findings inside the PostgreSQL headers
# themselves are suppressed: they are not ours to fix.
# clang-tidy: the checks of .clang-tidy (bugprone-*, clang-analyzer-*, minus
# two noisy ones, with the reasons there), then the suppression table below.
#
# Environment: PG_CONFIG (default /usr/lib/postgresql/15/bin/pg_config).
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
TOOLS=("${@:-cppcheck}")
(($# > 0)) || TOOLS=(cppcheck clang-tidy)

# Narrow suppressions of clang-tidy findings, one per line:
#   check | file (basename, regex) | regex the flagged source line matches | why
# (fields separated by " | ", a pipe with a space on each side)
# Matching the source text, not a line number, keeps a suppression on its
# construct when the code around it moves, and lets the same check report
# anything new.
SUPPRESSIONS=$(
	cat <<'EOF'
bugprone-implicit-widening-of-multiplication-result | .*\.c | ALLOCSET_(DEFAULT|SMALL|START_SMALL)_SIZES | PostgreSQL's macro: int constant products (8 * 1024 * 1024) passed as Size; constant, cannot overflow
bugprone-implicit-widening-of-multiplication-result | dead_letters\.c | TE_MAX_RETRY_DELAY_MS | the constant 10 * 60 * 1000 (600000) computed in int and compared with an int64: no overflow
bugprone-narrowing-conversions | domain_events\.c | \.val\.string\.len = strlen\( | JsonbValue.val.string.len is an int in PostgreSQL's API; keys are literals and values are bounded by the argument limits (500 characters at most), far below INT_MAX
EOF
)

if [[ $EUID -eq 0 ]]; then
	missing=()
	for pair in cppcheck:cppcheck clang-tidy:clang-tidy python3:python3; do
		command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
	done
	[[ -x $PG_CONFIG ]] || missing+=(postgresql-server-dev-15)
	if ((${#missing[@]} > 0)); then
		echo "analyze.sh: installing ${missing[*]}"
		apt-get update
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
	fi
fi
for tool in "${TOOLS[@]}"; do
	case $tool in
	cppcheck | clang-tidy) command -v "$tool" >/dev/null || {
		echo "analyze.sh: $tool not found (apt-get install $tool)" >&2
		exit 2
	} ;;
	*)
		echo "analyze.sh: unknown tool $tool (cppcheck or clang-tidy)" >&2
		exit 2
		;;
	esac
done

WORK=$(mktemp -d /tmp/task_events_analyze.XXXXXX)
trap 'rm -rf -- "$WORK"' EXIT
INCLUDE_SERVER=$("$PG_CONFIG" --includedir-server)
cd -- "$ROOT"
shopt -s nullglob
SOURCES=(src/*.c consumer/*.c)
shopt -u nullglob
FINDINGS=0
declare -A COUNT

# cppcheck --------------------------------------------------------------------
run_cppcheck() {
	local out=$WORK/cppcheck.txt n
	# -D__GNUC__ etc.: check the one configuration the code is built in,
	# instead of every combination of the headers' #ifdefs (slow, and
	# mostly configurations PostgreSQL 15 on Linux never compiles).
	if ! cppcheck --quiet --std=c99 --enable=warning,performance,portability \
		--inline-suppr --error-exitcode=0 \
		-D__GNUC__=12 -D__x86_64__ -D__linux__ -D__STDC__ \
		-I src/include -I consumer -I "$INCLUDE_SERVER" -I "$("$PG_CONFIG" --includedir)" \
		--suppress="*:$INCLUDE_SERVER/*" \
		--template='{file}:{line}: [cppcheck:{id}] {severity}: {message}' \
		-j "$(nproc)" "${SOURCES[@]}" 2>"$out"; then
		cat "$out"
		echo "analyze.sh: cppcheck failed to run" >&2
		exit 2
	fi
	n=$(grep -c -E '^[^ ]+:[0-9]+: \[cppcheck:' "$out" || true)
	grep -E '^[^ ]+:[0-9]+: \[cppcheck:' "$out" || true
	COUNT[cppcheck]=$n
	FINDINGS=$((FINDINGS + n))
}

# clang-tidy ------------------------------------------------------------------

# The compile commands PGXS would run, for clang: from make's dry run of a
# full rebuild, minus gcc-only options.
make_compile_commands() {
	make -n -B -C "$ROOT" PG_CONFIG="$PG_CONFIG" 2>/dev/null |
		python3 -c '
import json, os, re, shlex, sys
root, out = sys.argv[1], sys.argv[2]
gcc_only = ("-Wimplicit-fallthrough=", "-Wcast-function-type", "-fexcess-precision",
            "-Wno-format-truncation", "-Wno-stringop-truncation",
            "-Wmissing-format-attribute", "-Werror")
entries = []
directory = root
for line in sys.stdin:
    # consumer/ is built by a sub-make, in its own directory.
    m = re.match(r"make\[\d+\]: (Entering|Leaving) directory \x27(.*)\x27", line)
    if m:
        directory = m.group(2) if m.group(1) == "Entering" else root
        continue
    args = shlex.split(line)
    if not args or not args[-1].endswith(".c") or "-c" not in args or "-emit-llvm" in args:
        continue
    file = os.path.relpath(os.path.join(directory, args[-1]), root)
    if not file.startswith(("src/", "consumer/")):
        continue
    args = ["clang"] + [a for a in args[1:] if not a.startswith(gcc_only)]
    entries.append({"directory": directory, "arguments": args, "file": os.path.join(root, file)})
if not entries:
    sys.exit("no compile commands found in make -n -B output")
json.dump(entries, open(out, "w"), indent=1)
' "$ROOT" "$WORK/compile_commands.json"
}

run_clang_tidy() {
	local raw=$WORK/clang-tidy.raw out=$WORK/clang-tidy.txt n
	make_compile_commands
	# One process per file, as many at once as there are CPUs.
	# shellcheck disable=SC2016 # $1 and $2 are sh -c's, not ours
	if ! printf '%s\n' "${SOURCES[@]}" |
		xargs -P "$(nproc)" -I{} sh -c 'clang-tidy -p "$1" --quiet "$2" 2>&1 || true' _ "$WORK" {} >"$raw"; then
		echo "analyze.sh: clang-tidy failed to run" >&2
		exit 2
	fi
	# Findings only (not the code excerpts), relative paths, each once
	# (a header finding is reported once per file that includes it), minus
	# the suppression table.
	SUPPRESSIONS=$SUPPRESSIONS python3 - "$ROOT" "$raw" >"$out" <<'PY'
import os, re, sys
root, raw = sys.argv[1], sys.argv[2]
rules = []
for line in os.environ["SUPPRESSIONS"].splitlines():
    if line.strip():
        check, fname, text, why = [p.strip() for p in line.split(" | ", 3)]
        rules.append((check, re.compile(fname + "$"), re.compile(text)))
pat = re.compile(r"^(?P<file>[^:\s]+):(?P<line>\d+):\d+: (?P<kind>warning|error): (?P<msg>.*?)(?: \[(?P<check>[^\]]+)\])?$")
seen, suppressed = set(), 0
for l in open(raw, errors="replace"):
    m = pat.match(l.rstrip("\n"))
    if not m:
        continue
    path = os.path.relpath(os.path.join(root, m["file"]), root) if not os.path.isabs(m["file"]) else os.path.relpath(m["file"], root)
    check = m["check"] or ("clang-diagnostic-error" if m["kind"] == "error" else "unknown")
    key = (path, m["line"], check, m["msg"])
    if key in seen:
        continue
    seen.add(key)
    try:
        src = open(os.path.join(root, path), errors="replace").read().splitlines()[int(m["line"]) - 1]
    except (OSError, IndexError):
        src = ""
    if any(c == check and f.search(os.path.basename(path)) and t.search(src) for c, f, t in rules):
        suppressed += 1
        continue
    print(f"{path}:{m['line']}: [{check}] {m['kind']}: {m['msg']}")
print(f"# suppressed by the table in scripts/analyze.sh: {suppressed}", file=sys.stderr)
PY
	n=$(grep -c . "$out" || true)
	cat "$out"
	COUNT[clang-tidy]=$n
	FINDINGS=$((FINDINGS + n))
}

for tool in "${TOOLS[@]}"; do
	echo "==================== $tool ===================="
	start=$(date +%s)
	case $tool in
	cppcheck) run_cppcheck ;;
	clang-tidy) run_clang_tidy ;;
	esac
	echo "---- $tool: ${COUNT[$tool]} finding(s), $(($(date +%s) - start))s"
done

echo "analyze.sh: ${#SOURCES[@]} files; $FINDINGS finding(s)"
((FINDINGS == 0)) || exit 1

#!/usr/bin/env bash
# Install PostgreSQL with the TimescaleDB extension, and run throwaway clusters for tests.
#
#   timescaledb.sh install          install the server and the extension (root; idempotent)
#   timescaledb.sh start DIR [PORT] create a cluster in DIR, start it, print its URL last on stdout
#   timescaledb.sh stop DIR         stop the cluster in DIR (fast shutdown)
#   timescaledb.sh url DIR          print the URL of the running cluster in DIR
#
# Environment:
#   PG_CONFIG             pg_config of the server to use (default: the newest
#                         /usr/lib/postgresql/MAJOR/bin/pg_config that has a server)
#   TIMESCALEDB_CACHE_DIR build cache kept between runs
#                         (default /var/cache/pccc-gateway/timescaledb; optional)
#   TIMESCALEDB_SUITE     Debian suite whose source package is built when the machine's
#                         own archive has no TimescaleDB package (default trixie)
#
# Exit status: 0 on success, 1 on failure, 2 on a usage error, 3 when `start` finds
# no TimescaleDB installed for the server.
set -euo pipefail

readonly PROG=${0##*/}
readonly DB_NAME=gateway
readonly DB_USER=gateway
readonly DB_PASSWORD=gateway
readonly START_TIMEOUT_S=60
readonly STOP_TIMEOUT_S=30
readonly EXIT_NOT_INSTALLED=3
# sun_path in struct sockaddr_un is 108 bytes on Linux, including the final NUL.
readonly MAX_SOCKET_PATH=107

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Print the header comment as help and exit with the given status: 0 for a help request,
# printing to stdout, or 2 for a usage error, printing to stderr.
usage() {
    local status=${1:-2} output=2
    ((status == 0)) && output=1
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&"$output"
    exit "$status"
}

is_root() { [[ $(id -u) -eq 0 ]]; }

# ---------------------------------------------------------------- server discovery

# Print the pg_config of the server to use, or nothing when no server is installed.
find_pg_config() {
    if [[ -n ${PG_CONFIG:-} ]]; then
        [[ -x $PG_CONFIG ]] || die "PG_CONFIG=$PG_CONFIG is not an executable"
        printf '%s\n' "$PG_CONFIG"
        return
    fi
    local dir newest=""
    while IFS= read -r dir; do
        if [[ -x $dir/postgres && -x $dir/pg_config ]]; then
            newest=$dir
        fi
    done < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -V)
    if [[ -n $newest ]]; then
        printf '%s\n' "$newest/pg_config"
        return
    fi
    # A pg_config on PATH may belong to libpq-dev only, so it counts only next to a server.
    local on_path
    if on_path=$(command -v pg_config) && [[ -x $("$on_path" --bindir)/postgres ]]; then
        printf '%s\n' "$on_path"
    fi
}

pg_major() { "$1" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/'; }

control_file() { printf '%s/extension/timescaledb.control\n' "$("$1" --sharedir)"; }

timescaledb_installed() {
    [[ -f $(control_file "$1") && -f $("$1" --pkglibdir)/timescaledb.so ]]
}

# ---------------------------------------------------------------- apt helpers

APT_UPDATED=0
INSTALL_LOG=/dev/null

apt_update_once() {
    ((APT_UPDATED)) && return 1
    log "running apt-get update"
    apt-get update >>"$INSTALL_LOG" 2>&1 || die "apt-get update failed (see $INSTALL_LOG)"
    APT_UPDATED=1
}

# Update the package lists when the machine has none at all.
ensure_apt_lists() {
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        apt_update_once || true
    fi
}

package_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) == ii* ]]
}

apt_candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ && $2 != "(none)" { print $2 }'
}

# Install the named packages that are missing. A failed install is retried once after
# `apt-get update`, because stale package lists point at files the mirror has dropped.
apt_install() {
    local missing=() package
    for package in "$@"; do
        package_installed "$package" || missing+=("$package")
    done
    ((${#missing[@]})) || return 0
    ensure_apt_lists
    log "installing ${missing[*]}"
    local -a install=(apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=300)
    if DEBIAN_FRONTEND=noninteractive "${install[@]}" "${missing[@]}" >>"$INSTALL_LOG" 2>&1; then
        return 0
    fi
    apt_update_once || die "apt-get install ${missing[*]} failed (see $INSTALL_LOG)"
    DEBIAN_FRONTEND=noninteractive "${install[@]}" "${missing[@]}" >>"$INSTALL_LOG" 2>&1 \
        || die "apt-get install ${missing[*]} failed (see $INSTALL_LOG)"
}

# ---------------------------------------------------------------- building from source

# Print a deb822 `deb-src` stanza for SUITE main, with the URI and Signed-By of the
# machine's own Debian entry: the first enabled entry whose suites include the
# machine's codename and whose components include main.
debian_src_stanza() {
    local suite=$1 codename
    # shellcheck source=/dev/null
    codename=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
    [[ -n $codename ]] || die "VERSION_CODENAME is missing from /etc/os-release"
    python3 - "$codename" "$suite" <<'PY'
import glob
import re
import sys

codename, suite = sys.argv[1], sys.argv[2]


def one_line_entries(path):
    """Yield (types, uri, suites, components, signed_by) from a one-line sources file."""
    with open(path, encoding="utf-8") as handle:
        for raw in handle:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            options = {}
            match = re.match(r"^(\S+)\s+\[([^\]]*)\]\s+(.*)$", line)
            if match:
                kind, option_text, rest = match.groups()
                for item in option_text.split():
                    key, _, value = item.partition("=")
                    options[key.lower()] = value
                words = [kind] + rest.split()
            else:
                words = line.split()
            if len(words) < 4:
                continue
            yield [words[0]], words[1], [words[2]], words[3:], options.get("signed-by")


def deb822_entries(path):
    """Yield the same tuples from a deb822 .sources file; Signed-By keeps its line breaks."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    for block in re.split(r"\n\s*\n", text):
        fields, current = {}, None
        for line in block.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and current:
                fields[current] += "\n" + line
                continue
            key, sep, value = line.partition(":")
            if sep:
                current = key.strip().lower()
                fields[current] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or "uris" not in fields:
            continue
        yield (
            fields.get("types", "").split(),
            fields["uris"].split()[0],
            fields.get("suites", "").split(),
            fields.get("components", "").split(),
            fields.get("signed-by"),
        )


paths = glob.glob("/etc/apt/sources.list") + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
entries = [entry for path in paths for entry in one_line_entries(path)]
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    entries.extend(deb822_entries(path))

for types, uri, suites, components, signed_by in entries:
    if {"deb", "deb-src"} & set(types) and codename in suites and "main" in components:
        print("Types: deb-src")
        print(f"URIs: {uri}")
        print(f"Suites: {suite}")
        print("Components: main")
        if signed_by:
            print(f"Signed-By: {signed_by}")
        sys.exit(0)
sys.exit(f"no apt source entry for suite {codename!r} with component main was found")
PY
}

# Set up CACHE/apt as a private apt configuration that contains only the deb-src entry,
# so the system's own source list and package lists stay untouched.
prepare_private_apt() {
    local cache=$1 suite=$2 stanza
    stanza=$(debian_src_stanza "$suite") || die "cannot derive a deb-src entry from /etc/apt"
    mkdir -p "$cache/apt/sources.list.d" "$cache/apt/lists/partial"
    : >"$cache/apt/sources.list"
    printf '%s\n' "$stanza" >"$cache/apt/sources.list.d/timescaledb-src.sources"
    # apt downloads as the _apt user where that user exists and can write the target.
    if id _apt >/dev/null 2>&1; then
        chown _apt "$cache/apt/lists/partial"
    fi
}

private_apt() {
    local cache=$1
    shift
    "$@" \
        -o Dir::Etc::SourceList="$cache/apt/sources.list" \
        -o Dir::Etc::SourceParts="$cache/apt/sources.list.d" \
        -o Dir::State::Lists="$cache/apt/lists" \
        -o Dir::Cache::pkgcache= \
        -o Dir::Cache::srcpkgcache=
}

# Print the path of a downloaded timescaledb .dsc, downloading the source package from
# SUITE when the cache has none.
fetch_source() {
    local cache=$1 suite=$2 dsc
    dsc=$(compgen -G "$cache/source/timescaledb_*.dsc" | sort -V | tail -n 1 || true)
    if [[ -n $dsc ]]; then
        log "using cached source $(basename "$dsc")"
        printf '%s\n' "$dsc"
        return
    fi

    prepare_private_apt "$cache" "$suite"
    log "fetching the timescaledb source package from Debian $suite"
    private_apt "$cache" apt-get update >>"$INSTALL_LOG" 2>&1 \
        || die "apt-get update for the $suite deb-src entry failed (see $INSTALL_LOG)"

    local download="$cache/source.partial"
    rm -rf "$download"
    mkdir -p "$download"
    if id _apt >/dev/null 2>&1; then
        chown _apt "$download"
    fi
    (cd "$download" && private_apt "$cache" apt-get source --download-only timescaledb) \
        >>"$INSTALL_LOG" 2>&1 || die "apt-get source timescaledb failed (see $INSTALL_LOG)"
    rm -rf "$cache/source"
    mv "$download" "$cache/source"
    dsc=$(compgen -G "$cache/source/timescaledb_*.dsc" | sort -V | tail -n 1 || true)
    [[ -n $dsc ]] || die "apt-get source left no timescaledb .dsc in $cache/source"
    printf '%s\n' "$dsc"
}

# Unpack the .dsc (with Debian's patches applied) and print the source tree's path.
unpack_source() {
    local cache=$1 dsc=$2 version tree
    version=$(awk '/^Version:/ { print $2; exit }' "$dsc")
    tree="$cache/build/timescaledb-$version"
    if [[ ! -f $tree/bootstrap ]]; then
        log "unpacking timescaledb $version"
        rm -rf "$tree" "$tree.partial"
        mkdir -p "$cache/build"
        dpkg-source -x "$dsc" "$tree.partial" >>"$INSTALL_LOG" 2>&1 \
            || die "dpkg-source -x $dsc failed (see $INSTALL_LOG)"
        mv "$tree.partial" "$tree"
    fi
    printf '%s\n' "$tree"
}

build_from_source() {
    local pg_config=$1 suite=$2 cache=$3 major dsc tree
    major=$(pg_major "$pg_config")
    apt_install "postgresql-server-dev-$major" cmake gcc make dpkg-dev

    dsc=$(fetch_source "$cache" "$suite")
    tree=$(unpack_source "$cache" "$dsc")

    # A build directory already configured for this pg_config is reused.
    if ! grep -qxF "PG_CONFIG:FILEPATH=$pg_config" "$tree/build/CMakeCache.txt" 2>/dev/null; then
        log "configuring $(basename "$tree") for PostgreSQL $major (Apache-only)"
        # SEND_TELEMETRY_DEFAULT=NO keeps the server from reporting to Timescale's host.
        (cd "$tree" && BUILD_FORCE_REMOVE=true ./bootstrap \
            -DAPACHE_ONLY=1 -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF -DWARNINGS_AS_ERRORS=OFF \
            -DSEND_TELEMETRY_DEFAULT=NO -DPG_CONFIG="$pg_config" </dev/null) \
            >>"$INSTALL_LOG" 2>&1 || die "bootstrap failed (see $INSTALL_LOG)"
    fi
    log "building and installing $(basename "$tree")"
    make -C "$tree/build" -j"$(nproc)" install >>"$INSTALL_LOG" 2>&1 \
        || die "make install failed (see $INSTALL_LOG)"
}

# Print a writable cache directory: the configured one, or a fresh temporary one.
cache_dir() {
    local dir=${TIMESCALEDB_CACHE_DIR:-/var/cache/pccc-gateway/timescaledb}
    if mkdir -p "$dir" 2>/dev/null && [[ -w $dir ]]; then
        printf '%s\n' "$dir"
    else
        mktemp -d /tmp/pccc-timescaledb-build-XXXXXX
    fi
}

cmd_install() {
    (($# == 0)) || usage
    local pg_config
    pg_config=$(find_pg_config)
    if [[ -n $pg_config ]] && timescaledb_installed "$pg_config"; then
        log "TimescaleDB is already installed for PostgreSQL $(pg_major "$pg_config") ($(control_file "$pg_config"))"
        return 0
    fi
    is_root || die "installing needs root; run: sudo $0 install"

    local cache
    cache=$(cache_dir)
    INSTALL_LOG="$cache/install.log"
    : >"$INSTALL_LOG"
    log "details go to $INSTALL_LOG"

    if [[ -z $pg_config ]]; then
        ensure_apt_lists
        apt_install postgresql
        pg_config=$(find_pg_config)
        [[ -n $pg_config ]] || die "no PostgreSQL server found after installing the postgresql package"
    fi
    local major
    major=$(pg_major "$pg_config")
    log "PostgreSQL server $major ($pg_config)"

    ensure_apt_lists
    local name distro_package=""
    for name in "postgresql-$major-timescaledb" "timescaledb-2-postgresql-$major"; do
        if [[ -n $(apt_candidate "$name") ]]; then
            distro_package=$name
            break
        fi
    done

    if [[ -n $distro_package ]]; then
        apt_install "$distro_package"
    else
        log "no TimescaleDB package for PostgreSQL $major in this machine's archive; building from source"
        build_from_source "$pg_config" "${TIMESCALEDB_SUITE:-trixie}" "$cache"
    fi

    timescaledb_installed "$pg_config" \
        || die "TimescaleDB is still missing: $(control_file "$pg_config") not found"
    log "TimescaleDB installed for PostgreSQL $major"
}

# ---------------------------------------------------------------- clusters

# Run a command as USER: directly when that is the current user, through runuser as root.
run_as() {
    local user=$1
    shift
    if [[ $user == "$(id -un)" ]]; then
        "$@"
    elif is_root; then
        runuser -u "$user" -- "$@"
    else
        die "cannot run ${1##*/} as $user: the cluster belongs to $user, not to $(id -un)"
    fi
}

free_port() {
    python3 -c 'import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])'
}

cluster_url() { printf 'postgresql://%s@127.0.0.1:%s/%s\n' "$DB_USER" "$1" "$DB_NAME"; }

# Print the log's last lines to stderr, to explain a failed start.
show_log_tail() {
    if [[ -f $1 ]]; then
        log "last lines of $1:"
        tail -n 20 "$1" >&2
    fi
}

cmd_start() {
    (($# == 1 || $# == 2)) || usage
    local dir port=${2:-} pg_config
    dir=$(realpath -m -- "$1")
    if [[ -n $port ]]; then
        if ! [[ $port =~ ^[0-9]{1,5}$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
            die "invalid PORT: $port (expected a TCP port number from 1 to 65535)"
        fi
    fi

    pg_config=$(find_pg_config)
    if [[ -z $pg_config ]] || ! timescaledb_installed "$pg_config"; then
        log "error: PostgreSQL with TimescaleDB is not installed; run: $0 install (as root)"
        exit "$EXIT_NOT_INSTALLED"
    fi
    local bindir
    bindir=$("$pg_config" --bindir)

    # The socket path DIR/.s.PGSQL.PORT must fit in sun_path, for 5-digit ports too.
    local socket_path="$dir/.s.PGSQL.65535"
    if ((${#socket_path} > MAX_SOCKET_PATH)); then
        die "DIR is too long for a unix socket path ($socket_path has ${#socket_path} bytes, max $MAX_SOCKET_PATH); use a short one such as \$(mktemp -d /tmp/pccc-pg-XXXXXX)"
    fi

    mkdir -p -- "$dir"
    if [[ -n $(ls -A -- "$dir") ]]; then
        die "DIR $dir is not empty; start needs an empty or missing directory"
    fi
    local user
    user=$(id -un)
    if is_root; then
        # PostgreSQL refuses to run as root, so the cluster belongs to postgres.
        user=postgres
        id "$user" >/dev/null 2>&1 || die "user $user does not exist; run: $0 install"
        chown "$user:" "$dir"
        chmod 0700 "$dir"
        runuser -u "$user" -- test -w "$dir" -a -x "$dir" \
            || die "user $user cannot write $dir: a parent directory is not searchable; use a directory under /tmp"
    fi
    # The server and initdb resolve relative paths from here, and postgres cannot enter /root.
    cd /

    local data="$dir/data" logfile="$dir/postgres.log"
    log "initdb $data"
    run_as "$user" "$bindir/initdb" -D "$data" -U "$DB_USER" --auth=trust \
        --encoding=UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; die "initdb failed in $data"; }
    printf '%s\n' "$bindir" >"$dir/bindir"
    printf "include = 'test-cluster.conf'\n" >>"$data/postgresql.conf"

    local attempt auto_port=0
    [[ -n $port ]] || auto_port=1
    for attempt in 1 2 3; do
        ((auto_port)) && port=$(free_port)
        # Settings beyond initdb's defaults. Telemetry is off because tests must send
        # traffic to this machine only, and TimescaleDB would report to Timescale's host.
        cat >"$data/test-cluster.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
shared_preload_libraries = 'timescaledb'
timescaledb.telemetry_level = off
EOF
        chown "$user:" "$data/test-cluster.conf" 2>/dev/null || true
        log "starting PostgreSQL on 127.0.0.1:$port"
        if run_as "$user" "$bindir/pg_ctl" -D "$data" -l "$logfile" -w -t "$START_TIMEOUT_S" \
            start >/dev/null; then
            break
        fi
        # Another process may have taken the port that free_port chose, so try a new one.
        if ((auto_port && attempt < 3)) && grep -q 'could not bind' "$logfile" 2>/dev/null; then
            log "port $port was taken; retrying with another port"
            continue
        fi
        show_log_tail "$logfile"
        die "PostgreSQL failed to start in $data (log: $logfile)"
    done

    # Stop the server again if any later step fails.
    trap 'log "setup failed; stopping the server"; run_as "$user" "$bindir/pg_ctl" -D "$data" -m immediate -w -t "$STOP_TIMEOUT_S" stop >/dev/null 2>&1 || true' EXIT
    run_as "$user" "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U "$DB_USER" -d postgres \
        -c "ALTER ROLE $DB_USER PASSWORD '$DB_PASSWORD'" \
        -c "CREATE DATABASE $DB_NAME OWNER $DB_USER" >&2 \
        || die "creating database $DB_NAME failed"
    "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" -U "$DB_USER" -d "$DB_NAME" -t "$START_TIMEOUT_S" \
        || die "PostgreSQL does not accept TCP connections on 127.0.0.1:$port"
    trap - EXIT

    cluster_url "$port" >"$dir/url"
    cat "$dir/url"
}

# Check that DIR contains a cluster created by `start`, and set BINDIR, DATA and OWNER.
load_cluster() {
    local dir=$1
    DATA="$dir/data"
    [[ -f $DATA/PG_VERSION && -f $dir/bindir ]] || die "no cluster created by $PROG start was found in $dir"
    BINDIR=$(cat "$dir/bindir")
    OWNER=$(stat -c %U "$DATA")
}

cmd_stop() {
    (($# == 1)) || usage
    local dir
    dir=$(realpath -m -- "$1")
    load_cluster "$dir"
    cd /
    # pg_ctl status exits with 3 when no server runs, also after a crash left a stale pid file.
    local status=0
    run_as "$OWNER" "$BINDIR/pg_ctl" -D "$DATA" status >/dev/null || status=$?
    if ((status == 3)); then
        log "no server is running in $DATA"
        return 0
    fi
    log "stopping PostgreSQL in $DATA"
    if run_as "$OWNER" "$BINDIR/pg_ctl" -D "$DATA" -m fast -w -t "$STOP_TIMEOUT_S" stop >/dev/null; then
        return 0
    fi
    log "fast shutdown did not finish within ${STOP_TIMEOUT_S}s; using immediate shutdown"
    run_as "$OWNER" "$BINDIR/pg_ctl" -D "$DATA" -m immediate -w -t "$STOP_TIMEOUT_S" stop >/dev/null \
        || die "PostgreSQL in $DATA did not stop"
}

cmd_url() {
    (($# == 1)) || usage
    local dir url port
    dir=$(realpath -m -- "$1")
    load_cluster "$dir"
    [[ -f $dir/url ]] || die "$dir has no URL file: the cluster never finished starting"
    url=$(cat "$dir/url")
    port=${url##*:}
    port=${port%%/*}
    "$BINDIR/pg_isready" -q -h "$dir" -p "$port" -t 5 \
        || die "the cluster in $dir is not accepting connections"
    printf '%s\n' "$url"
}

main() {
    (($# >= 1)) || usage
    local command=$1
    shift
    case $command in
        install) cmd_install "$@" ;;
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        url) cmd_url "$@" ;;
        -h | --help | help) usage 0 ;;
        *) log "error: unknown command: $command"; usage ;;
    esac
}

main "$@"

# SPDX-License-Identifier: MIT OR Apache-2.0
# Sourced by bench/earlyoom.sh and bench/valgrind.sh: a private APT
# configuration (its own sources.list, lists and archive cache under a
# directory of the caller's) for `apt-get download` from other Debian
# suites, so the host's sources, lists and installed packages are never
# touched.
#
#   private_apt DIR SUITE...   writes DIR/etc/sources.list for the suites'
#                              main components and sets PRIVATE_APT, the
#                              apt-get options that use it
#
# Only the Packages index is fetched: no translations, no DEP-11 metadata
# (tens of MB that `apt-get download` never reads).

private_apt() {
    local dir=$1 suite
    shift
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/etc"
    for suite in "$@"; do
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main"
    done >"$dir/etc/sources.list"
    PRIVATE_APT=(-o "Dir::Etc::sourcelist=$dir/etc/sources.list" -o "Dir::Etc::sourceparts=/dev/null"
        -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o "APT::Sandbox::User=root"
        -o "Acquire::Languages=none" -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
        -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
        -o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false"
        -o "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false")
}

#!/bin/sh
# `cmake --install` of a build tree into a fresh prefix, then a consumer
# project built against it with find_package(usvm), and run; the installed
# usvm tool answers --version.
# usage: install_test.sh BUILD_DIR CONSUMER_SRC WORK_DIR CXX "CXX_FLAGS"
set -eu
build=$1; consumer=$2; work=$3; cxx=$4; flags=$5
rm -rf "$work"
mkdir -p "$work"
cmake --install "$build" --prefix "$work/prefix" >/dev/null
test -f "$work/prefix/include/usvm/driver/driver.h"
test -f "$work/prefix/lib/cmake/usvm/usvmConfig.cmake"
"$work/prefix/bin/usvm" --version
cmake -S "$consumer" -B "$work/build" -G Ninja -DCMAKE_PREFIX_PATH="$work/prefix" \
  -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_CXX_FLAGS="$flags" >/dev/null
cmake --build "$work/build" >/dev/null
"$work/build/consumer"

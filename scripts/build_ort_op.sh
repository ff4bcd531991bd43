#!/usr/bin/env bash
# Build the ONNX Runtime custom-op library for sparse-cpu artifacts (sparsedeploy/kernels/csrc/ort_op/): with it,
# a `export --target sparse-cpu` model runs whole in one ONNX Runtime session (any ONNX Runtime >= the headers'
# version, no sparsedeploy Python needed):
#   so = onnxruntime.SessionOptions(); so.register_custom_ops_library("<BUILD_DIR>/libsparsedeploy_ort_op.so")
#
#   bash scripts/build_ort_op.sh [BUILD_DIR]       (default build/ort_op in this checkout; prints the library path)
#
# It needs cmake and a C/C++ compiler, and ONNX Runtime's C/C++ headers, which no PyPI or npm package ships: unless
# ONNXRUNTIME_ROOT names an ONNX Runtime package (include/ below it), the headers come from Debian's
# libonnxruntime-dev (trixie), fetched from deb.debian.org once and checked against its SHA-256 (headers only: the
# library links nothing of ONNX Runtime; the session that registers it hands it the API).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$here/build/ort_op}"
deb_url="${SPARSEDEPLOY_ORT_HEADERS_URL:-http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb}"
deb_sha256="14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"

die() { echo "error: $*" >&2; exit 2; }
command -v cmake >/dev/null 2>&1 || die "cmake not found: install it (e.g. apt-get install cmake or pip install cmake)"
mkdir -p "$build"

root="${ONNXRUNTIME_ROOT:-}"
if [ -z "$root" ]; then
  root="$build/onnxruntime-headers/usr"
  if [ ! -f "$root/include/onnxruntime/onnxruntime_cxx_api.h" ]; then
    command -v curl >/dev/null 2>&1 || die "curl not found: install it, or set ONNXRUNTIME_ROOT to an ONNX Runtime package"
    tmp="$(mktemp -d "$build/.headers.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    curl -fsSL --retry 2 -m 120 -o "$tmp/dev.deb" "$deb_url" \
      || die "cannot download ONNX Runtime's headers from $deb_url: set ONNXRUNTIME_ROOT to an ONNX Runtime package"
    echo "$deb_sha256  $tmp/dev.deb" | sha256sum -c --quiet - >/dev/null 2>&1 \
      || die "$deb_url does not have the expected SHA-256 $deb_sha256: not using it"
    if command -v dpkg-deb >/dev/null 2>&1; then
      dpkg-deb -x "$tmp/dev.deb" "$tmp/x"
    else  # a .deb is an ar archive holding data.tar.*
      (cd "$tmp" && ar x dev.deb && mkdir x && tar -xf data.tar.* -C x)
    fi
    rm -rf "$build/onnxruntime-headers"
    mv "$tmp/x" "$build/onnxruntime-headers"
  fi
fi
[ -d "$root/include" ] || die "ONNXRUNTIME_ROOT=$root has no include/ directory: point it at an ONNX Runtime package"

generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
log="$build/build.log"
if ! { cmake -S "$here/sparsedeploy/kernels/csrc/ort_op" -B "$build/cmake" "${generator[@]}" \
         -DONNXRUNTIME_ROOT="$root" -DCMAKE_BUILD_TYPE=Release && cmake --build "$build/cmake"; } >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  die "the custom-op library did not build (full log: $log)"
fi
cp "$build/cmake/libsparsedeploy_ort_op.so" "$build/.libsparsedeploy_ort_op.so.tmp"
mv "$build/.libsparsedeploy_ort_op.so.tmp" "$build/libsparsedeploy_ort_op.so"
echo "$build/libsparsedeploy_ort_op.so"

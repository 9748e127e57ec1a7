#!/usr/bin/env bash
# Fails when a SIMD intrinsic was compiled as a function of its own in the
# release binary. Intrinsics only inline into code compiled with their
# target feature; a generic helper or closure LLVM leaves out of line runs
# without it, and every intrinsic in it becomes a call (session 19: the
# AVX2 pass spent a third of its time in `_mm256_add_ps` and friends,
# with every test still passing). CPU-feature probes (_xgetbv) are fine.
# Usage: scripts/check_simd_inlined.sh [BINARY] (default target/release/vgg16)
set -euo pipefail
bin=${1:-target/release/vgg16}
if ! command -v nm >/dev/null; then
  echo "SKIPPED the out-of-line intrinsic check: nm (binutils) not installed"
  exit 0
fi
found=$(nm -C "$bin" | grep 'core::core_arch::' | grep -v '_xgetbv' || true)
if [ -n "$found" ]; then
  echo "SIMD intrinsics compiled out of line in $bin (each a call where one instruction was meant):"
  echo "$found"
  exit 1
fi
echo "no SIMD intrinsic out of line in $bin"

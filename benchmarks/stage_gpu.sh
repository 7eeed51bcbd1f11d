#!/usr/bin/env bash
# Stage the wheels of benchmarks/gpu_wheels.txt for the lent GPU machine (no registry there) in as few device calls
# as can be: each wheel re-stored uncompressed, then tarred and compressed with xz (CUDA kernels shrink 3.5x more
# than in the wheels' zip), files a one-H200 run never loads left out (gpu_wheels.txt says which):
#   .carry/suite-wheels.tar.xz        the stages' own imports (torchao, datasets, math-verify, ...), ~5 MB
#   .carry/vllm-wheels.tar.xz.pNN     vLLM and its needs, ~110 MB, in parts of PART_MIB (default 52)
#   .carry/SHA256SUMS
#   bash benchmarks/stage_gpu.sh [PART_MIB]
# A call carries at most 64 MiB with the repository (5.4 MB without data/): call 1 carries SHA256SUMS, the suite
# archive and part 00, call 2 SHA256SUMS and part 01; gpu_suite.sh --install puts them together (its header).
set -euo pipefail
cd "$(dirname "$0")/.."
part_mib=${1:-52}
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=""
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_26 \
         manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do plat="$plat --platform ${p}_x86_64"; done
sed -n '/^# \[suite\]/,$p' benchmarks/gpu_wheels.txt | grep -v '^#' > "$work/suite.txt"
sed '/^# \[suite\]/,$d' benchmarks/gpu_wheels.txt | grep -v '^#' > "$work/vllm.txt"
for set in suite vllm; do
  python3 -m pip download -q --isolated --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
      --platform any -d "$work/$set" -r "$work/$set.txt"
done
python3 - "$work/suite" "$work/vllm" <<'PY'
import sys, zipfile
from pathlib import Path
# kernels and libraries a one-H200 run never loads (see gpu_wheels.txt), left out of their wheel and its RECORD
DROP = {"vllm": ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/_moe_C_stable_libtorch.abi3.so"),
        "xgrammar": ("xgrammar/lib/libxgrammar.a",)}
for folder in sys.argv[1:]:
    for whl in sorted(Path(folder).glob("*.whl")):  # stored, not deflated: xz then sees the raw bytes
        drop = DROP.get(whl.name.split("-")[0], ())
        tmp = whl.with_suffix(".tmp")
        with zipfile.ZipFile(whl) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                if info.filename in drop:
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD") and drop:
                    data = b"".join(line for line in data.splitlines(keepends=True)
                                    if line.split(b",")[0].decode() not in drop)
                info.compress_type = zipfile.ZIP_STORED
                dst.writestr(info, data)
        tmp.replace(whl)
PY
rm -rf .carry && mkdir -p .carry
tar -cf - -C "$work/suite" . | xz -T2 -9 > .carry/suite-wheels.tar.xz
tar -cf - -C "$work/vllm" . | xz -T2 -9 > "$work/vllm-wheels.tar.xz"
split -b "${part_mib}m" -d "$work/vllm-wheels.tar.xz" .carry/vllm-wheels.tar.xz.p
(cd .carry && sha256sum suite-wheels.tar.xz vllm-wheels.tar.xz.p* > SHA256SUMS)
ls -l .carry
echo "tracked files without data/: $(git ls-files | grep -v '^data/' | xargs du -cb | tail -1 | cut -f1) bytes"

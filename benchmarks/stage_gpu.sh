#!/usr/bin/env bash
# Stage the wheels of benchmarks/gpu_wheels.txt for the lent GPU machine (no registry there) in as few device calls
# as can be: each wheel re-stored uncompressed, then tarred and compressed with xz (CUDA kernels shrink 3.5x more
# than in the wheels' zip), files a one-H200 run never loads left out (gpu_wheels.txt says which):
#   .carry/suite-wheels.tar.xz        the stages' own imports (torchao, datasets, math-verify, ...), ~5 MB
#   .carry/vllm-wheels.tar.xz.pNN     vLLM and its needs, ~113 MB, in parts as large as a call can take
#   .carry/SHA256SUMS
#   bash benchmarks/stage_gpu.sh
# A call carries at most 64 MiB, the repository included (5.5 MB without data/): call 1 carries SHA256SUMS, the
# suite archive and part 00, call 2 SHA256SUMS and part 01; gpu_suite.sh --install puts them together (its header).
set -euo pipefail
cd "$(dirname "$0")/.."
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
repo=$(git ls-files -co --exclude-standard | grep -v '^data/' | xargs du -cb | tail -1 | cut -f1)
python3 - "$work/vllm-wheels.tar.xz" "$repo" "$(stat -c %s .carry/suite-wheels.tar.xz)" <<'PY'
import sys
bundle, repo, suite = open(sys.argv[1], "rb").read(), int(sys.argv[2]), int(sys.argv[3])
room = 64 * 2**20 - repo - 2**20  # what a call carries beside the repository, 1 MiB kept free
sizes, at = [], 0
while at < len(bundle):  # part 00 travels with the suite archive
    sizes.append(min(room - (suite if not sizes else 0), len(bundle) - at))
    at += sizes[-1]
at = 0
for i, n in enumerate(sizes):
    open(f".carry/vllm-wheels.tar.xz.p{i:02d}", "wb").write(bundle[at:at + n])
    at += n
PY
(cd .carry && sha256sum suite-wheels.tar.xz vllm-wheels.tar.xz.p* > SHA256SUMS)
ls -l .carry
echo "repository without data/: $repo bytes; calls: $(ls .carry/vllm-wheels.tar.xz.p* | wc -l)"

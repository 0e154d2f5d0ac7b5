#!/usr/bin/env bash
# Downloads into DIR the wheels the GPU machine lacks (it has no network; its image has torch,
# torchvision, numpy, pyarrow, pandas, scikit-learn, Pillow and their dependencies) to run
# pipelines.train and benchmarks/gpu_throughput.py; benchmarks/gpu_install.sh installs them there.
#   benchmarks/gpu_wheels.sh DIR [PYTHON_VERSION]     PYTHON_VERSION: the GPU machine's, default 3.12
# What: benchmarks/gpu_requirements.txt and its dependencies, at constraints.txt's versions,
# manylinux x86_64. DIR's old *.whl files are replaced. PYTHON=... picks the python whose pip
# (>= 22.2) resolves and downloads (default: .venv/bin/python, else python3).
# The wheels are repacked to fit the 64 MiB that travel with the checkout: ray without its Java
# jars, RLlib, Serve, LLM and the dashboard's source maps; ELF files stripped; every wheel
# recompressed with LZMA (pip installs these; the installing python needs its lzma module).
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; "") usage >&2; exit 2 ;; esac
[ $# -le 2 ] || { usage >&2; exit 2; }
DIR=$1
PYVER=${2:-3.12}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REQS=$ROOT/benchmarks/gpu_requirements.txt
LIMIT_MIB=64

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" - <<'EOF' || { echo "gpu_wheels.sh: $PYTHON needs pip >= 22.2 (pip install --dry-run --report)" >&2; exit 1; }
import sys
from pip import __version__ as v
sys.exit(tuple(int(x) for x in v.split(".")[:2]) < (22, 2))
EOF
command -v strip >/dev/null || echo "gpu_wheels.sh: no strip (binutils): ELF files stay unstripped, about 6 MiB more" >&2

# The GPU image's packages: torch 2.11 and its dependencies, torchvision, numpy, pyarrow, pandas
# (python-dateutil), scikit-learn (scipy, joblib, threadpoolctl), Pillow. Never shipped: the image's
# builds stay. Shipped though an image may have them: typing-extensions (pydantic 2.14 needs
# >= 4.16) and six (opencensus needs it; python-dateutil 4 no longer brings it).
EXCLUDE="torch torchvision torchcodec triton nvidia-* cuda-* numpy pyarrow pandas python-dateutil
  scikit-learn scipy joblib threadpoolctl pillow filelock fsspec jinja2 markupsafe networkx sympy
  mpmath setuptools"
# Taken as their pure-python wheels: their C extensions only speed them up; 7 MiB less.
PURE="aiohttp multidict yarl frozenlist propcache charset-normalizer sqlalchemy fonttools"
# Never imported by Ray Train, Tune or Data (serve and llm only lazily, by the dashboard and
# ray.data.llm); the jars serve Java workers; *.map: the dashboard's JavaScript source maps.
RAY_DROP="ray/jars/ ray/rllib/ ray/serve/ ray/llm/ ray/dashboard/client/build/*.map"

if [ -d "$DIR" ] && [ -n "$(find "$DIR" -mindepth 1 -maxdepth 1 ! -name '*.whl' -print -quit)" ]; then
  echo "gpu_wheels.sh: $DIR holds files other than wheels; give an empty or a wheels-only folder" >&2
  exit 2
fi
mkdir -p "$DIR"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
platforms=(--only-binary=:all: --python-version "$PYVER" --platform manylinux_2_28_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)

echo "gpu_wheels.sh: resolving $REQS for Python $PYVER" >&2
"$PYTHON" -m pip install --quiet --dry-run --ignore-installed --report "$tmp/report.json" "${platforms[@]}" \
  --target "$tmp/target" -c "$ROOT/constraints.txt" -r "$REQS"

EXCLUDE=$EXCLUDE PURE=$PURE "$PYTHON" - "$tmp" <<'EOF'
import fnmatch, json, os, re, sys
tmp = sys.argv[1]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
exclude, pure = os.environ["EXCLUDE"].split(), set(os.environ["PURE"].split())
with open(f"{tmp}/report.json") as f:
    closure = sorted((norm(i["metadata"]["name"]), i["metadata"]["version"]) for i in json.load(f)["install"])
skipped = [n for n, _ in closure if any(fnmatch.fnmatch(n, p) for p in exclude)]
keep = [(n, v) for n, v in closure if n not in skipped]
for kind, rows in (("binary", [r for r in keep if r[0] not in pure]), ("pure", [r for r in keep if r[0] in pure])):
    with open(f"{tmp}/{kind}.txt", "w") as f:
        f.writelines(f"{n}=={v}\n" for n, v in rows)
print(f"gpu_wheels.sh: {len(keep)} packages to download; the image's: {' '.join(skipped) or 'none'}", file=sys.stderr)
EOF

mkdir "$tmp/wheels"
"$PYTHON" -m pip download --quiet --no-deps "${platforms[@]}" -d "$tmp/wheels" -r "$tmp/binary.txt"
if [ -s "$tmp/pure.txt" ]; then
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --platform any \
    -d "$tmp/wheels" -r "$tmp/pure.txt"
fi

echo "gpu_wheels.sh: repacking (strip, LZMA; ray trimmed)" >&2
RAY_DROP=$RAY_DROP "$PYTHON" - "$tmp/wheels" "$tmp/repacked" <<'EOF'
import base64, csv, fnmatch, hashlib, io, os, shutil, subprocess, sys, tempfile, zipfile
src, dst = sys.argv[1:3]
os.makedirs(dst)
drop = os.environ["RAY_DROP"].split()
strip = shutil.which("strip")

def record_hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

def stripped(data):
    # --strip-unneeded: symbol tables and debug info go, what dynamic linking needs stays
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/elf"
        with open(path, "wb") as f:
            f.write(data)
        if subprocess.run([strip, "--strip-unneeded", path], capture_output=True).returncode:
            return data
        with open(path, "rb") as f:
            out = f.read()
    return out if len(out) < len(data) else data

def dropped(wheel, name):
    return wheel.startswith("ray-") and any(
        name.startswith(p) if p.endswith("/") else fnmatch.fnmatch(name, p) for p in drop)

for wheel in sorted(os.listdir(src)):
    with zipfile.ZipFile(os.path.join(src, wheel)) as zin:
        infos = [i for i in zin.infolist() if not dropped(wheel, i.filename)]
        gone = {i.filename for i in zin.infolist()} - {i.filename for i in infos}
        files, changed = {}, {}
        for info in infos:
            data = zin.read(info)
            if strip and data[:4] == b"\x7fELF":
                new = stripped(data)
                if new is not data:
                    changed[info.filename], data = (record_hash(new), str(len(new))), new
            files[info.filename] = data
    record = next(n for n in files if n.count("/") == 1 and n.endswith(".dist-info/RECORD"))  # not a vendored one
    # pip neither checks RECORD nor minds missing files, but an installed RECORD should be true
    rows = [[row[0], *changed[row[0]]] if row[0] in changed else row
            for row in csv.reader(io.StringIO(files[record].decode())) if row and row[0] not in gone]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    files[record] = out.getvalue().encode()
    with zipfile.ZipFile(os.path.join(dst, wheel), "w", zipfile.ZIP_LZMA) as zout:
        for info in infos:
            info.compress_type = zipfile.ZIP_LZMA
            zout.writestr(info, files[info.filename])
    note = f" ({len(gone)} files dropped)" if gone else ""
    print(f"  {wheel}: {len(changed)} ELF stripped{note}", file=sys.stderr)
EOF

find "$DIR" -maxdepth 1 -name '*.whl' -delete
mv "$tmp/repacked"/*.whl "$DIR"/
( cd "$DIR" && ls -l -- *.whl | awk '{printf "%8.2f MiB  %s\n", $5 / 1048576, $9}' | sort -rn )
total=$(find "$DIR" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{s += $1} END {printf "%.1f", s / 1048576}')
count=$(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l)
echo "gpu_wheels.sh: $count wheels for Python $PYVER in $DIR, $total MiB in all"
if awk -v t="$total" -v l="$LIMIT_MIB" 'BEGIN {exit !(t > l)}'; then
  echo "gpu_wheels.sh: over the $LIMIT_MIB MiB that travel with the checkout" >&2
  exit 1
fi

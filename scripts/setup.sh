#!/usr/bin/env bash
# Set up synthmrf in ./.venv (Python 3.11+).
#   scripts/setup.sh          the product (enough for `synthmrf demo` and the node)
#   scripts/setup.sh --test   plus the test tools: pytest/ruff/mypy, and as root the Debian packages the
#                             integration tests talk to (orthanc, dcmtk, dicom3tools, dcm2niix, postgresql) and
#                             mricron-data (Colin27, a real head scan the tests process)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=""
# The environment takes about 2.5 GB (torch alone 1.5 GB) and pip unpacks wheels in the temporary folder first.
need_mb=4096
for folder in . "${TMPDIR:-/tmp}"; do
    [[ -d "$folder" ]] || continue
    free_mb=$(df -Pm "$folder" 2>/dev/null | awk 'NR == 2 {print $4}' || true)
    if [[ -n "$free_mb" && "$free_mb" -lt "$need_mb" && ! -x .venv/bin/synthmrf ]]; then
        echo "setup: only ${free_mb} MB free in $(cd "$folder" && pwd); the environment needs about ${need_mb} MB" >&2
        exit 1
    fi
done
if [[ "${1:-}" == "--test" ]]; then
    extras="[test]"
    missing=()
    for tool in Orthanc storescu dciodvfy dcm2niix; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 || missing+=("postgresql")
    [[ -f /usr/share/mricron/templates/ch2.nii.gz ]] || missing+=("mricron-data")
    if ((${#missing[@]})); then
        if [[ $(id -u) -ne 0 ]]; then
            echo "setup: missing ${missing[*]}: install orthanc dcmtk dicom3tools dcm2niix postgresql mricron-data (needs root)" >&2
            exit 1
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc dcmtk dicom3tools dcm2niix postgresql mricron-data \
            >/dev/null
        # The Debian packages start a system Orthanc on 4242/8042 and a PostgreSQL cluster on 5432; tests start
        # their own on free ports.
        systemctl stop orthanc 2>/dev/null || service orthanc stop 2>/dev/null || true
        systemctl stop postgresql 2>/dev/null || service postgresql stop 2>/dev/null || true
    fi
fi
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pin torch first (an unpinned one would pull the newest, multi-GB CUDA build). The index decides the build: here
# pip's configured local wheels give the CPU one; on PyPI set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
.venv/bin/python -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".${extras}"
echo "setup: ready (.venv)"

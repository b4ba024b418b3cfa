#!/usr/bin/env bash
# The test command: the whole suite, then the Triton kernels again under the CPU interpreter. Fails when a
# pass fails or when no test ran at all.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
export VTP_FAST_REQUIRE_NATIVE=${VTP_FAST_REQUIRE_NATIVE:-1}
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT

"$PY" -m pytest -q -p no:cacheprovider --junitxml="$reports/main.xml" "$@"
TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider -m triton --junitxml="$reports/triton.xml" "$@"

"$PY" - "$reports" <<'PYEOF'
import sys, xml.etree.ElementTree as ET, pathlib
ran = {}
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.xml")):
    s = ET.parse(f).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    ran[f.stem] = int(s.get("tests")) - int(s.get("skipped"))
print("tests run:", ", ".join(f"{k} {v}" for k, v in ran.items()))
if not all(ran.values()):
    sys.exit("error: a test pass ran no test")
PYEOF

#!/usr/bin/env bash
# Screenshot a report's index.html in headless Chromium and check it has no broken images.
#
#   bash tools/screenshot_report.sh reports/2025-08-10_1500 [out.png]
#
# Needs `chromium` (Debian/Ubuntu: `apt-get install -y chromium`); the test suite does not, it checks
# every <img> src with Pillow instead (tests/test_report_gate.py).  Exit 1 on a broken image or no screenshot.
set -euo pipefail
report="${1:?usage: bash tools/screenshot_report.sh REPORT_DIR [OUT.png]}"
out="${2:-$report/screenshot.png}"
python_bin="${PYTHON:-.venv/bin/python}"
[ -f "$report/index.html" ] || { echo "no $report/index.html" >&2; exit 1; }
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$browser" ] || { echo "chromium not found (apt-get install -y chromium)" >&2; exit 1; }
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1200,2400 \
  --screenshot="$(realpath -m "$out")" "file://$(realpath "$report")/index.html" 2>/dev/null
"$python_bin" - "$report" "$out" <<'PY'
import sys
from html.parser import HTMLParser
from pathlib import Path
from PIL import Image

report, shot = Path(sys.argv[1]), Path(sys.argv[2])
class P(HTMLParser):
    srcs = []
    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))
p = P(); p.feed((report / "index.html").read_text())
broken = []
for src in p.srcs:
    try:
        with Image.open(report / src) as im:
            im.verify()
    except Exception as exc:
        broken.append(f"{src}: {exc}")
with Image.open(shot) as im:
    size = im.size
print(f"screenshot {shot} {size[0]}x{size[1]}; {len(p.srcs)} images, {len(broken)} broken")
for b in broken:
    print("BROKEN", b)
sys.exit(1 if broken or size[0] == 0 else 0)
PY

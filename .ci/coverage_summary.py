"""Line and branch coverage of the last `make test` (coverage.py's combined data), one line:
so a change that drops either shows at every landing."""

import json
import subprocess
import sys

out = subprocess.run(
    [sys.executable, "-m", "coverage", "json", "-q", "-o", "-"], capture_output=True, text=True, check=True
).stdout
t = json.loads(out)["totals"]
print(
    f"coverage: lines {100 * t['covered_lines'] / t['num_statements']:.1f}% "
    f"({t['covered_lines']}/{t['num_statements']}), branches "
    f"{100 * t['covered_branches'] / max(1, t['num_branches']):.1f}% ({t['covered_branches']}/{t['num_branches']}), "
    f"together {t['percent_covered']:.1f}%"
)

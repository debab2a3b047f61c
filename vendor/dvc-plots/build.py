"""Build template.html, the page `dvc plots show` fills (.dvc/config: plots.html_template), with Vega inlined.

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so the plots render blank offline. This
template carries the same versions that dvc-render's specs are written for, so `dvc plots show` opens offline.

    npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2   # then unpack the three tarballs
    python vendor/dvc-plots/build.py <vega>/build/vega.min.js <vega-lite>/build/vega-lite.min.js \
        <vega-embed>/build/vega-embed.min.js

The three libraries are BSD-3-Clause (University of Washington Interactive Data Lab); their licenses are the
LICENSE-* files beside this one. The SHA-256 of each input is checked against SHA256 below.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

SHA256 = {
    "vega.min.js": "4794d0169cb1f3ebad8117fe98ba5bd652dd725905ec0384e832391dbccb03be",  # vega 5.20.2
    "vega-lite.min.js": "d73157451b3978015ab31dacd55ff90d986ab8663fc0abed50f97b3cd90002cb",  # vega-lite 5.2.0
    "vega-embed.min.js": "1ba9826431ddc9805e815ad92acc811c819f2bfd32bda2a128b8c4b5070fab5e",  # vega-embed 6.18.2
}

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{{refresh_tag}}
<title>TEMA: dvc plots</title>
<!-- vega 5.20.2, vega-lite 5.2.0, vega-embed 6.18.2 (BSD-3-Clause, vendor/dvc-plots/LICENSE-*), inlined so
     that this page needs no network; built by vendor/dvc-plots/build.py -->
{scripts}
<style>body {{ font-family: system-ui, sans-serif; }} table {{ border-spacing: 15px; }}</style>
</head>
<body>
<h1>Training curves</h1>
<p>Validation score (mean full-ranking MRR of the two domains) per epoch, mean over seeds, one line per model;
one plot per evaluation table (reports/curves/). Written by <code>dvc plots show</code>.</p>
{{plot_divs}}
</body>
</html>
"""


def main(paths: list[str]) -> None:
    scripts = []
    for path in map(Path, paths):
        data = path.read_bytes()
        expected = SHA256.get(path.name)
        if expected is None or hashlib.sha256(data).hexdigest() != expected:
            raise SystemExit(f"{path}: not one of the expected files ({', '.join(SHA256)}) or its SHA-256 differs")
        if b"</script" in data:
            raise SystemExit(f"{path}: contains '</script', cannot be inlined")
        scripts.append(f"<script>\n{data.decode()}\n</script>")
    out = Path(__file__).with_name("template.html")
    out.write_text(PAGE.format(scripts="\n".join(scripts)), encoding="utf-8")
    print("wrote", out, f"({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main(sys.argv[1:])

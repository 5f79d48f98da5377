#!/bin/sh
# The HTML report in headless Chromium: every chart must lay out with a
# non-empty size and draw its data (polylines with length, bars with
# height). A copy of the report gets a small script that measures them
# and puts the verdict in the title, read back with --dump-dom; a
# screenshot is kept next to the report to look at.
# usage: report_chromium_test.sh USVM_BIN CHROMIUM OUT_DIR
set -eu
usvm=$1; chromium=$2; out=$3
mkdir -p "$out"
"$usvm" run --quiet --report "$out/report.html"
cp "$out/report.html" "$out/report_probe.html"
cat >> "$out/report_probe.html" <<'JS'
<script>
const charts = [...document.querySelectorAll('svg.chart')];
let ok = 0, why = [];
for (const c of charts) {
  const r = c.getBoundingClientRect();
  let ink = 0;
  for (const p of c.querySelectorAll('polyline.series')) ink += p.getTotalLength();
  for (const b of c.querySelectorAll('rect.bar')) ink += b.getBBox().height;
  if (r.width > 100 && r.height > 100 && ink > 0) ok++; else why.push(c.id + ':' + r.width + 'x' + r.height + ':' + ink);
}
const rows = document.querySelectorAll('#hot tr').length - 1;
document.title = 'CHARTS ' + ok + '/' + charts.length + ' ROWS ' + rows + ' ' + why.join(',');
</script>
JS
flags="--headless --no-sandbox --disable-gpu --no-first-run --disable-dev-shm-usage --user-data-dir=$out/chromium-profile"
title=$("$chromium" $flags --dump-dom "file://$out/report_probe.html" 2>/dev/null | sed -n 's:.*<title>\(.*\)</title>.*:\1:p')
"$chromium" $flags --window-size=1400,1600 --screenshot="$out/report.png" "file://$out/report.html" >/dev/null 2>&1 || true
echo "chromium: $title; screenshot $out/report.png"
case "$title" in
  "CHARTS 3/3 ROWS "[1-9]*) exit 0 ;;
  *) echo "the report's charts did not render"; exit 1 ;;
esac

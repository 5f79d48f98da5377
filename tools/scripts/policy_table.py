#!/usr/bin/env python3
"""The policy table of docs/policies.md: every shipped scenario (its `short`
setting, passed as --set overrides) under every policy combination its
`settings:` name (all of them but `short`, in file order), one `usvm run
--compare` per scenario. Prints the commands and a Markdown table.

usage: tools/scripts/policy_table.py BUILD/tools/usvm/usvm [SCENARIO.yaml ...]
"""
import glob
import json
import os
import shlex
import subprocess
import sys
import tempfile

import yaml



def mib(b):
    return f"{b / (1 << 20):.1f}"


def main():
    usvm = sys.argv[1]
    files = sys.argv[2:] or sorted(glob.glob("scenarios/*.yaml"))
    rows, cmds = [], []
    for f in files:
        with open(f) as fh:
            doc = yaml.safe_load(fh)
        settings = doc.get("settings") or {}
        short = settings.get("short") or {}
        names = [n for n in settings if n != "short"]
        if not names:
            rows.append(f"| {doc['name']} | (no policy settings) |||||||||")
            continue
        sets = []
        for k, v in short.items():
            sets += ["--set", f"{k}={v}"]
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "m.json")
            cmd = [usvm, "run", f] + sets + ["--compare", ",".join(names), "--json", out, "-q"]
            cmds.append(" ".join(shlex.quote(c) for c in ["usvm"] + cmd[1:-3]))
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                rows.append(f"| {doc['name']} | (failed: exit {p.returncode}: {p.stderr.strip()[:100]}) |||||||")
                continue
            with open(out) as fh:
                runs = json.load(fh)
        for r in runs:
            pol = r["policies"]
            mig = r.get("migrations", {})
            k = r.get("kernels", {})
            ac = r.get("access_counters", {})
            rows.append(
                "| {} | {} | {} / {} / {} / {} | {} | {} | {} | {} | {:.1f} | {} | {} |".format(
                    doc["name"], r["setting"], pol["migration"], pol["eviction"], pol["thrashing"],
                    pol.get("access_counters", "off"),
                    r["gpu_faults"]["count"], mib(mig.get("bytes_to_vram", 0)), mib(mig.get("bytes_to_ram", 0)),
                    r["evictions"]["count"],
                    k.get("time_ns", 0) / 1e6, "{} / {}".format(pol["throttles"], pol["pins"]),
                    "{} / {}".format(ac.get("notifications", 0), ac.get("migrations", 0))))
    print("Commands (from the repository root):\n")
    print("```")
    for c in cmds:
        print(c)
    print("```\n")
    print("| scenario | setting | migration / eviction / thrashing / access counters | GPU faults | MiB to VRAM | MiB to RAM "
          "| evictions | kernel time, ms | throttles / pins | AC notifications / migrations |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()

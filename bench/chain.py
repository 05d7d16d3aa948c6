#!/usr/bin/env python3
"""Engine benchmark: a chain of trivial command stages, haic-pipe beside Snakemake.

Measures, side by side in one run (alternating the two tools):
  - full run of an N-stage chain from an empty workspace,
  - no-op re-run (everything up to date),
and, for haic-pipe alone, the no-op run of a 10,000-stage chain and the
driver's peak RSS on it.

Usage: python3 bench/chain.py [--haic target/release/haic-pipe]
       [--snakemake PATH] [--stages 100] [--reps 5] [--big 10000]
Snakemake: `python3 -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install snakemake==9.27.1`.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def write_haic(d, n):
    lines = ["stages:"]
    for i in range(n):
        dep = f"s{i-1}.txt" if i else "seed.txt"
        lines += [
            f"  s{i}:",
            "    kind: command",
            f"    cmd: \"cat {dep} > s{i}.txt; echo {i} >> s{i}.txt\"",
            f"    deps: [{dep}]",
            f"    outs: [s{i}.txt]",
        ]
    with open(os.path.join(d, "pipeline.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(d, "seed.txt"), "w") as f:
        f.write("seed\n")


def write_snake(d, n):
    rules = [f"rule all:\n    input: \"s{n-1}.txt\"\n"]
    for i in range(n):
        dep = f"s{i-1}.txt" if i else "seed.txt"
        rules.append(
            f"rule s{i}:\n    input: \"{dep}\"\n    output: \"s{i}.txt\"\n"
            f"    shell: \"cat {{input}} > {{output}}; echo {i} >> {{output}}\"\n"
        )
    with open(os.path.join(d, "Snakefile"), "w") as f:
        f.write("\n".join(rules))
    with open(os.path.join(d, "seed.txt"), "w") as f:
        f.write("seed\n")


def timed(cmd, cwd):
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{cmd} failed in {cwd}:\n{r.stderr.decode()[-2000:]}")
    return dt


def clean(d, tool):
    for name in os.listdir(d):
        if name.startswith("s") and name.endswith(".txt") and name[1:-4].isdigit():
            os.remove(os.path.join(d, name))
    for sub in (".haic", ".snakemake"):
        shutil.rmtree(os.path.join(d, sub), ignore_errors=True)


def peak_rss_kb(cmd, cwd):
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], cwd=cwd,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return int(r.stderr.decode().strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--haic", default="target/release/haic-pipe")
    ap.add_argument("--snakemake", default="/tmp/benchvenv/bin/snakemake")
    ap.add_argument("--stages", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--big", type=int, default=10000)
    a = ap.parse_args()
    haic = os.path.abspath(a.haic)
    root = tempfile.mkdtemp(prefix="haic-bench-")
    hd, sd = os.path.join(root, "haic"), os.path.join(root, "snake")
    os.makedirs(hd), os.makedirs(sd)
    write_haic(hd, a.stages)
    write_snake(sd, a.stages)
    hrun = [haic, "run", "pipeline.yaml", "--jobs", "1"]
    srun = [a.snakemake, "--cores", "1", "--quiet"]

    full = {"haic": [], "snake": []}
    noop = {"haic": [], "snake": []}
    for _ in range(a.reps):
        clean(hd, "haic"), clean(sd, "snake")
        full["haic"].append(timed(hrun, hd))
        full["snake"].append(timed(srun, sd))
        for _ in range(3):
            noop["haic"].append(timed(hrun, hd))
            noop["snake"].append(timed(srun, sd))
    med = {k: {t: statistics.median(v[t]) for t in v} for k, v in (("full", full), ("noop", noop))}
    print(f"{a.stages}-stage chain, {a.reps} full runs and {3*a.reps} no-op runs each, medians:")
    for k in ("full", "noop"):
        h, s = med[k]["haic"], med[k]["snake"]
        print(f"  {k:5} haic-pipe {h*1000:9.1f} ms   snakemake {s*1000:9.1f} ms   ratio {s/h:6.1f}x")

    bd = os.path.join(root, "big")
    os.makedirs(bd)
    write_haic(bd, a.big)
    t_full = timed(hrun, bd)
    times = [timed(hrun, bd) for _ in range(5)]
    rss = peak_rss_kb(hrun, bd)
    print(f"{a.big}-stage chain: full run {t_full:.1f} s; no-op run median {statistics.median(times)*1000:.0f} ms "
          f"(min {min(times)*1000:.0f}, max {max(times)*1000:.0f}); no-op peak RSS {rss/1024:.1f} MiB")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

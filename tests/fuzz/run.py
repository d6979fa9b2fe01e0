#!/usr/bin/env python3
"""Build the libFuzzer harnesses of tests/fuzz/ and run them one at a time.

Each harness is compiled with clang (-fsanitize=fuzzer,address,undefined,
UBSan fatal) together with the native/*.c files it drives - never into
the cffi module - into build/fuzz/bin/.  A run replays the reproducers of
tests/fuzz/crashes/<harness>/ first (each must now pass), then fuzzes from
the committed seeds tests/fuzz/corpus/<harness>/ into the work corpus
build/fuzz/corpus/<harness>/ (kept between runs, not committed).  Crash,
leak and timeout inputs land in build/fuzz/artifacts/<harness>/, the full
log in build/fuzz/logs/<harness>.log.

    python3 tests/fuzz/run.py [--seconds N] [--runs N] [--smoke] [harness ...]

Prints per harness: execs, execs/s, libFuzzer's final cov: and ft:,
corpus size, crashes; exits non-zero if any harness crashed.  --smoke is
the CI run: 20 s each unless told otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "tests" / "fuzz"
NATIVE = ROOT / "native"
OUT = ROOT / "build" / "fuzz"

CC = os.environ.get("CC_FUZZ", "clang")
CFLAGS = ["-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=undefined",
          "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-fno-strict-aliasing", "-pthread",
          f"-I{NATIVE}", f"-fsanitize-coverage-allowlist={FUZZ / 'coverage-allowlist.txt'}"]
DEVICES = ["virtq.c", "memory.c", "guard.c", "virtio_mmio.c", "irq.c", "virtio_blk.c",
           "virtio_net.c", "virtio_rng.c"]
# harness -> the native sources it links (the code under test).
HARNESSES = {
    "virtq": ["virtq.c", "memory.c", "guard.c"],
    "virtio_blk": DEVICES,
    "virtio_net_tx": DEVICES,
    "virtio_net_rx": DEVICES,
    "virtio_rng": DEVICES,
    "virtio_mmio": DEVICES + ["bus.c"],
    "state_restore": DEVICES,
    "virtio_vsock": DEVICES + ["virtio_vsock.c"],
}
# ASan's leak check runs after each input (libFuzzer's -detect_leaks, on by default).
ENV = {"ASAN_OPTIONS": "abort_on_error=1:detect_leaks=1:symbolize=1",
       "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


def build(name: str) -> Path:
    """Compile the harness if it or anything it includes changed."""
    exe = OUT / "bin" / name
    srcs = [FUZZ / f"fuzz_{name}.c"] + [NATIVE / s for s in HARNESSES[name]]
    deps = srcs + list(FUZZ.glob("*.h")) + list(NATIVE.glob("*.h")) + [Path(__file__),
                                                                        FUZZ / "coverage-allowlist.txt"]
    if exe.exists() and exe.stat().st_mtime >= max(p.stat().st_mtime for p in deps):
        return exe
    exe.parent.mkdir(parents=True, exist_ok=True)
    cmd = [CC, *CFLAGS, *map(str, srcs), "-o", str(exe)]
    print(f"== build {name}", flush=True)
    subprocess.run(cmd, check=True)
    return exe


def replay(name: str, exe: Path) -> bool:
    """Every kept reproducer of a fixed bug must run clean."""
    repros = sorted((FUZZ / "crashes" / name).glob("*")) if (FUZZ / "crashes" / name).is_dir() else []
    if not repros:
        return True
    r = subprocess.run([str(exe), *map(str, repros)], check=False, env={**os.environ, **ENV},
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        print(r.stderr[-4000:], file=sys.stderr)
        print(f"== {name}: a reproducer in tests/fuzz/crashes/{name}/ fails again")
    return r.returncode == 0


def coverage(names: list[str]) -> int:
    """Source coverage of native/ reached by the corpora (seeds and work
    corpus): each harness rebuilt with clang's profile instrumentation (no
    sanitizers), run over its corpus once, the profiles merged, llvm-cov's
    report printed.  Needs llvm-profdata-14 and llvm-cov-14 (llvm-14)."""
    tools = {t: f"{t}-14" for t in ("llvm-profdata", "llvm-cov")}
    if any(subprocess.run(["which", t], capture_output=True, check=False).returncode
           for t in tools.values()):
        print("--coverage needs llvm-profdata-14 and llvm-cov-14: apt-get install llvm-14")
        return 1
    prof = OUT / "prof"
    prof.mkdir(parents=True, exist_ok=True)
    for old in prof.glob("*.profraw"):
        old.unlink()
    exes = []
    for name in names:
        exe = OUT / "covbin" / name
        exe.parent.mkdir(parents=True, exist_ok=True)
        srcs = [FUZZ / f"fuzz_{name}.c"] + [NATIVE / s for s in HARNESSES[name]]
        subprocess.run([CC, "-g", "-O0", "-fsanitize=fuzzer", "-fprofile-instr-generate",
                        "-fcoverage-mapping", "-std=gnu11", "-pthread", f"-I{NATIVE}",
                        *map(str, srcs), "-o", str(exe)], check=True)
        dirs = [d for d in (OUT / "corpus" / name, FUZZ / "corpus" / name) if d.is_dir()]
        r = subprocess.run([str(exe), "-runs=0", *map(str, dirs)], check=False,
                           env={**os.environ, "LLVM_PROFILE_FILE": str(prof / f"{name}.profraw")},
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode:
            print(r.stderr[-3000:])
            print(f"== {name}: an input of its corpus fails in the coverage build")
            return 1
        exes.append(exe)
    subprocess.run([tools["llvm-profdata"], "merge", "-o", str(prof / "all.profdata"),
                    *map(str, prof.glob("*.profraw"))], check=True)
    objs = [a for e in exes[1:] for a in ("-object", str(e))]
    files = sorted({NATIVE / s for n in names for s in HARNESSES[n]} - {NATIVE / "irq.c"})
    subprocess.run([tools["llvm-cov"], "report", str(exes[0]), *objs,
                    f"-instr-profile={prof / 'all.profdata'}", *map(str, files)], check=True)
    return 0


def last(pattern: str, text: str) -> str:
    found = re.findall(pattern, text)
    return found[-1] if found else "?"


def fuzz(name: str, exe: Path, seconds: int, runs: int) -> dict[str, str | int]:
    corpus, seeds = OUT / "corpus" / name, FUZZ / "corpus" / name
    artifacts, log = OUT / "artifacts" / name, OUT / "logs" / f"{name}.log"
    for d in (corpus, artifacts, log.parent):
        d.mkdir(parents=True, exist_ok=True)
    before = set(artifacts.iterdir())
    cmd = [str(exe), f"-artifact_prefix={artifacts}/", "-print_final_stats=1", "-timeout=10",
           "-rss_limit_mb=2048", str(corpus), str(seeds)]
    limits = [f"-max_total_time={seconds}"] + ([f"-runs={runs}"] if runs else [])
    cmd[1:1] = limits
    print(f"== fuzz {name}: {' '.join(limits)}", flush=True)
    t0 = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, check=False, env={**os.environ, **ENV}, stdout=f, stderr=subprocess.STDOUT,
                            cwd=OUT).returncode
    took = time.monotonic() - t0
    text = log.read_text(errors="replace")
    new = sorted(set(artifacts.iterdir()) - before)
    if rc and not new:  # died without leaving an input: still a failure
        new = [Path("(no artifact)")]
    for a in new:
        print(f"   CRASH {name}: {a}  (log {log})")
    return {
        "harness": name,
        "execs": last(r"stat::number_of_executed_units:\s*(\d+)", text),
        "execs/s": last(r"stat::average_exec_per_sec:\s*(\d+)", text),
        "cov": last(r"cov: (\d+)", text),
        "ft": last(r"ft: (\d+)", text),
        "corpus": last(r"corp: (\d+)", text),
        "crashes": len(new),
        "seconds": round(took),
    }


def table(rows: list[dict[str, str | int]]) -> None:
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(width[c]) for c in cols))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("harness", nargs="*", help=f"any of {', '.join(HARNESSES)} (default: all)")
    ap.add_argument("--seconds", type=int, help="fuzzing time per harness (default 300, smoke 20)")
    ap.add_argument("--runs", type=int, default=0,
                    help="stop a harness after this many execs (or --seconds, whichever first)")
    ap.add_argument("--smoke", action="store_true", help="the short CI run")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--coverage", action="store_true",
                    help="no fuzzing: line coverage of native/ by the corpora (llvm-cov)")
    args = ap.parse_args()
    seconds = args.seconds or (20 if args.smoke else 300)
    names = args.harness or list(HARNESSES)
    unknown = set(names) - set(HARNESSES)
    if unknown:
        ap.error(f"no such harness: {', '.join(sorted(unknown))}")
    if args.coverage:
        return coverage(names)
    rows, failed = [], []
    for name in names:
        exe = build(name)
        if args.build_only:
            continue
        if not replay(name, exe):
            failed.append(name)
            continue
        row = fuzz(name, exe, seconds, args.runs)
        rows.append(row)
        if row["crashes"]:
            failed.append(name)
    if args.build_only:
        return 0
    if rows:
        print()
        table(rows)
    print(f"fuzz: {len(names) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
